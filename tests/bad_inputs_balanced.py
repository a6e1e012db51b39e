"""Bad-input rows of BalancedDKGMDataset (see bad_inputs.py for the form)."""
import os
from pathlib import Path

import torch

from dkgm_aug import BalancedDKGMDataset, DataError, DKGMError


class Pixels(torch.utils.data.Dataset):
    """Distinct 8x8 gray images (``invert``: the same labels with other pixels); items are
    ``(image, label)``, ``(image, label, name)`` or ``{"image", "label", "name"}``."""

    def __init__(self, labels=(0, 0, 0, 1), invert=False, layout="tuple"):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (len(labels), 1, 8, 8), generator=g, dtype=torch.uint8)
        self.images = 255 - self.images if invert else self.images
        self.labels_, self.layout = list(labels), layout

    def __len__(self):
        return len(self.labels_)

    def __getitem__(self, i):
        image, label, name = self.images[i], self.labels_[i], f"img{i}.png"
        return {"tuple": (image, label), "triple": (image, label, name),
                "dict": {"image": image, "label": label, "name": name}}[self.layout]


class Named(Pixels):
    """Pixels whose labels index ``classes``, torchvision's convention."""
    classes = ["airplane", "bird"]


def _other_pixels(ckpt, folder: Path):
    path = folder / "pixels.safetensors"
    BalancedDKGMDataset(Pixels(), ckpt, cache=path, progress=False).precompute(progress=False)
    return BalancedDKGMDataset(Pixels(invert=True), ckpt, cache=path, progress=False)


def _fifo(ckpt, folder: Path):
    fifo = folder / "pipe.safetensors"
    if not fifo.exists():
        os.mkfifo(fifo)
    return BalancedDKGMDataset(Pixels(), ckpt, cache=fifo, progress=False)


def _two_writers(ckpt, folder: Path):
    path = folder / "shared.safetensors"
    first, second = (BalancedDKGMDataset(Pixels(), ckpt, cache=path, seed=s, progress=False) for s in (0, 1))
    first.precompute(progress=False)
    second.precompute(progress=False)


def _old_noise_cache(ckpt, folder: Path):
    """A cache file as dkgm_aug wrote it before the counter-based seeded noise (no noise_scheme)."""
    from dkgm_aug import cache as cache_file
    path = folder / "old-noise.safetensors"
    ds = BalancedDKGMDataset(Pixels(), ckpt, progress=False).precompute(progress=False)
    old = {k: v for k, v in ds.fingerprint().items() if k not in ("noise_scheme", "dtype")}
    cache_file.write(path, torch.stack([ds._cache[j] for j in range(ds.n_synthetic)]), ds._digests, old)
    return BalancedDKGMDataset(Pixels(), ckpt, cache=path, progress=False)


def rows(ckpt, model, tmp):
    folder = Path(tmp) / "balanced"
    folder.mkdir(exist_ok=True)
    (folder / "a-file").write_text("")
    nan = float("nan")
    return [
        ("balanced: cache file made from another dataset's pixels", lambda: _other_pixels(ckpt, folder),
         (DKGMError, "was made from other images")),
        ("balanced: FIFO as the cache path", lambda: _fifo(ckpt, folder), (DKGMError, "is a FIFO, not a regular file")),
        ("balanced: cache path under a regular file (not writable)",
         lambda: BalancedDKGMDataset(Pixels(), ckpt, cache=folder / "a-file" / "c.safetensors", progress=False),
         (DKGMError, "is not a folder")),
        ("balanced: two datasets of different plans writing one cache file", lambda: _two_writers(ckpt, folder),
         (DKGMError, "give each dataset its own cache path")),
        ("balanced: NaN label", lambda: BalancedDKGMDataset(Pixels([0.0, 0.0, 1.0, nan]), ckpt, progress=False),
         (DataError, "NaN labels on 1 of 4 items")),
        ("balanced: dict items", lambda: sorted(BalancedDKGMDataset(Pixels(layout="dict"), ckpt, progress=False)[-1]),
         "ok: a synthetic item is its source's dict with the image replaced (image_key=, label_key= name the keys)"),
        ("balanced: (image, label, extra) items", lambda: len(BalancedDKGMDataset(Pixels(layout="triple"), ckpt,
                                                                                  progress=False)[-1]),
         "ok: a synthetic item keeps its source's extra fields, so batches collate"),
        ("balanced: labels= instead of reading items",
         lambda: BalancedDKGMDataset(Pixels(), ckpt, labels=[0, 0, 0, 1], progress=False).class_counts,
         "ok: labels taken as given, no item read"),
        ("balanced: seed=2**70", lambda: BalancedDKGMDataset(Pixels(), ckpt, seed=2 ** 70, progress=False),
         (DKGMError, "seed must be an integer in [0, 2**63)")),
        ("balanced: cache file made before the counter-based noise", lambda: _old_noise_cache(ckpt, folder),
         (DKGMError, "differs in ['noise_scheme']")),
        ("balanced: dtype=torch.float16 without device='cuda'",
         lambda: BalancedDKGMDataset(Pixels(), ckpt, dtype=torch.float16, progress=False),
         (DKGMError, "runs on CUDA only")),
        ("balanced: compile=1", lambda: BalancedDKGMDataset(Pixels(), ckpt, compile=1, progress=False),
         (DKGMError, "compile must be True or False")),
        ("balanced: label -1 (unlabelled, as STL10 'train+unlabeled') in a dataset with classes",
         lambda: BalancedDKGMDataset(Named([0, 0, 1, -1, -1]), ckpt, progress=False),
         (DataError, "2 items have negative labels [-1], which are not indices into the dataset's 2 classes")),
        ("balanced: binary labels -1 and 1, no class names",
         lambda: BalancedDKGMDataset(Pixels([-1, -1, -1, 1]), ckpt, progress=False).class_counts,
         "ok: -1 and 1 are two classes"),
    ]
