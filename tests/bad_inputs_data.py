"""Bad-input rows found by the second review (2026-11-28): data files, dataset subsets, long-tailed
splits, dict samples for a class-conditional generator and label filters whose classifier cannot
output the labels. Each used to give a wrong result with no error."""
import numpy as np
import torch

from dkgm_aug import DataError, DKGMAugment, LabelFilter
from dkgm_aug.augment import filtered_generate
from dkgm_aug.data import ImageDataset, image_folder, long_tailed_indices, npz
from conftest import micro_model, shapes_batch


def _npz(path, images, labels):
    np.savez(path, images=images, labels=labels)
    return path


def _empty_class(root):
    from PIL import Image
    from pathlib import Path
    (Path(root) / "cat").mkdir(parents=True, exist_ok=True)
    (Path(root) / "dog").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(Path(root) / "cat" / "a.png")
    return root


def _three_classes():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))


def rows(ckpt, model, tmp):
    small = ImageDataset(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1, 0, 1]))
    return [
        (".npz images stored N,C,H,W",
         lambda: npz(_npz(f"{tmp}/chw.npz", np.zeros((4, 1, 8, 8), np.uint8), np.arange(4))),
         (DataError, "N,C,H,W")),
        (".npz float labels that are not whole numbers",
         lambda: npz(_npz(f"{tmp}/frac.npz", np.zeros((3, 8, 8), np.uint8), np.array([0.0, 0.9999999, 2.0]))),
         (DataError, "whole numbers")),
        (".npz negative labels (-1 for unlabelled)",
         lambda: npz(_npz(f"{tmp}/neg.npz", np.zeros((3, 8, 8), np.uint8), np.array([-1, 0, 1]))),
         (DataError, "negative labels")),
        (".npz uint64 labels beyond int64",
         lambda: npz(_npz(f"{tmp}/big.npz", np.zeros((2, 8, 8), np.uint8), np.array([0, 2 ** 63 + 5], np.uint64))),
         (DataError, "too large")),
        ("image folder with an empty class folder", lambda: image_folder(_empty_class(f"{tmp}/folder")),
         (DataError, "hold no images")),
        ("subset with a boolean mask of the wrong length", lambda: small.subset(torch.tensor([True, False])),
         (DataError, "one value per item")),
        ("long-tailed split whose rho leaves a class empty",
         lambda: long_tailed_indices(torch.arange(10).repeat_interleave(20), 100), (DataError, "keeps every class")),
        ("conditional generator: dict sample with an index and no label key",
         lambda: DKGMAugment(micro_model(image_size=8).with_labels(3, stages=(1,)), seed=0)(
             {"image": shapes_batch(1, size=8)[0], "index": 2}), (DataError, "under the key 'label'")),
        ("conditional generator: tuple sample (img, index, label)",
         lambda: DKGMAugment(micro_model(image_size=8).with_labels(3, stages=(1,)), seed=0)(
             shapes_batch(1, size=8)[0], 2, 1), (DataError, "more than one number")),
        ("label filter: labels the classifier cannot output",
         lambda: filtered_generate(micro_model(image_size=8), shapes_batch(2, size=8), [1, 2], labels=[0, 5],
                                   label_filter=LabelFilter(_three_classes())),
         (DataError, "not outputs of the classifier")),
    ]
