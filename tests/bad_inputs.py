"""The table of bad inputs: each row is (what, call, expected) where expected is an error
type and a fragment of its message, or "ok: ..." for a documented behaviour. The test
(test_bad_inputs.py) runs every row; `python tests/bad_inputs.py docs/bad_inputs.md`
writes the docs table from the same rows, with the messages the library really gives."""
import sys

import numpy as np
import torch
from PIL import Image

from dkgm_aug import BalancedDKGMDataset, DataError, DKGMError, DKGMAugment, Trainer


class Items(torch.utils.data.Dataset):
    def __init__(self, labels, size=8):
        self.labels_ = list(labels)
        self.size = size

    def __len__(self):
        return len(self.labels_)

    def __getitem__(self, i):
        return torch.full((1, self.size, self.size), 0.5), self.labels_[i]


# Each area adds its rows in tests/bad_inputs_<area>.py (a ``rows(ckpt, model, tmp)`` there).
AREAS = ("transforms", "balanced", "trainer", "checkpoint", "bank", "conditional", "data")


def rows(ckpt, model, tmp):
    import importlib
    table = core_rows(ckpt, model, tmp)
    for area in AREAS:
        try:
            module = importlib.import_module(f"bad_inputs_{area}")
        except ModuleNotFoundError:
            continue
        table += module.rows(ckpt, model, tmp)
    return table


def core_rows(ckpt, model, tmp):
    aug = DKGMAugment(ckpt, seed=0)
    return [
        ("NaN pixels (transform)", lambda: aug(torch.full((1, 8, 8), float("nan"))), (DataError, "NaN")),
        ("inf pixels (model)", lambda: model.sample(torch.full((1, 1, 8, 8), float("inf"))), (DataError, "NaN or inf")),
        ("wrong channels (RGB image, gray generator)", lambda: aug(torch.rand(3, 8, 8)), (DataError, "convert_channels=True")),
        ("wrong channels with convert_channels=True", lambda: DKGMAugment(ckpt, convert_channels=True, seed=0)(torch.rand(3, 8, 8)).shape,
         "ok: converted to gray for the generator and back to 3 channels"),
        ("int16 image", lambda: aug(torch.zeros(1, 8, 8, dtype=torch.int16)), (DataError, "uint8 or float")),
        ("uint8 image holding only 0 and 1 (a binary image)",
         lambda: aug((torch.arange(64) % 2).to(torch.uint8).view(1, 8, 8)),
         (DataError, "hold only the values 0 and 1")),
        ("bool image", lambda: aug(torch.zeros(1, 8, 8, dtype=torch.bool)), (DataError, "uint8 or float")),
        ("float64 image", lambda: aug(torch.rand(1, 8, 8, dtype=torch.float64)).dtype, "ok: processed in float32, returned as float64"),
        ("zero-size image", lambda: aug(torch.zeros(1, 0, 8)), (DataError, "empty")),
        ("1x1 image", lambda: aug(torch.rand(1, 1, 1)).shape, "ok: generated (the U-Net pads and crops)"),
        ("odd size 13x7", lambda: aug(torch.rand(1, 13, 7)).shape, "ok: generated at 13x7"),
        ("2-D tensor (no channel axis)", lambda: aug(torch.rand(8, 8)), (DataError, "CHW or BCHW")),
        ("RGBA PIL image", lambda: aug(Image.new("RGBA", (8, 8))), (DataError, "convert('RGB')")),
        ("numpy image to the torchvision transform", lambda: aug(np.zeros((8, 8, 1), np.uint8)),
         "ok: not an image type for torchvision v2; passed through unchanged (use dkgm_aug.albumentations)"),
        ("empty dataset (wrapper)", lambda: BalancedDKGMDataset(Items([]), ckpt), (DataError, "empty")),
        ("empty dataset (trainer)", lambda: Trainer(model, torch.zeros(0, 1, 8, 8), out_dir=tmp, max_steps=1), (DataError, "empty")),
        ("single-class dataset", lambda: BalancedDKGMDataset(Items([0, 0, 0]), ckpt), (DataError, "at least 2")),
        ("dict strategy naming a class with zero samples", lambda: BalancedDKGMDataset(Items([0, 1, 1]), ckpt, sampling_strategy={5: 10}),
         (DKGMError, "not in the dataset")),
        ("dict strategy below the current count", lambda: BalancedDKGMDataset(Items([0, 1, 1]), ckpt, sampling_strategy={1: 1}),
         (DKGMError, "already has")),
        ("labels as 0-d tensors", lambda: BalancedDKGMDataset(Items([torch.tensor(0), torch.tensor(1), torch.tensor(1)]), ckpt, progress=False).class_counts,
         "ok: read with .item(); synthetic items carry the source's label object"),
        ("labels as strings", lambda: BalancedDKGMDataset(Items(["cat", "dog", "dog"]), ckpt, progress=False).class_counts,
         "ok: counted and balanced by string"),
        ("labels mixing strings and numbers", lambda: BalancedDKGMDataset(Items(["cat", 1, 1]), ckpt, progress=False),
         (DataError, "all numbers or all strings")),
        ("negative alpha", lambda: DKGMAugment(ckpt, alpha=-0.5), (DKGMError, "alpha")),
        ("steps = 0", lambda: model.sample(torch.zeros(1, 1, 8, 8), steps=0).shape, "ok: only u(x_kde, 0), no debiasing iterations"),
        ("negative steps", lambda: DKGMAugment(ckpt, steps=-1), (DKGMError, "steps")),
        ("p outside [0, 1]", lambda: DKGMAugment(ckpt, p=1.5), (DKGMError, "p (probability")),
        ("unknown sampling strategy", lambda: BalancedDKGMDataset(Items([0, 1, 1]), ckpt, sampling_strategy="majority"),
         (DKGMError, "unknown sampling_strategy")),
        ("float strategy on 10 classes", lambda: BalancedDKGMDataset(Items(list(range(10)) * 2), ckpt, sampling_strategy=0.5),
         (DKGMError, "exactly 2 classes")),
        ("missing checkpoint", lambda: DKGMAugment(tmp + "/missing.safetensors"), (DKGMError, "no checkpoint file")),
        ("unknown preset", lambda: __import__("dkgm_aug").DKGM.from_preset("huge"), (DKGMError, "unknown preset")),
        ("NaN training data", lambda: Trainer(model, torch.full((4, 1, 8, 8), float("nan")), out_dir=tmp, batch_size=2,
                                              max_steps=1, progress=False).fit(1), (DataError, "NaN")),
    ]


def run(row):
    """(passed, what happened) for one row."""
    what, call, expected = row
    try:
        result = call()
    except Exception as exc:
        if isinstance(expected, tuple) and isinstance(exc, expected[0]) and expected[1] in str(exc):
            return True, f"`{type(exc).__name__}`: {exc}"
        return False, f"unexpected {type(exc).__name__}: {exc}"
    if isinstance(expected, str):
        shown = f"array of shape {result.shape}" if isinstance(result, np.ndarray) else result
        return True, f"{expected[4:]} (returned {shown})"
    return False, f"no error, returned {result!r}"


if __name__ == "__main__":
    import tempfile
    sys.path.insert(0, "tests")
    from conftest import micro_model
    with tempfile.TemporaryDirectory() as tmp:
        model = micro_model(image_size=8)
        model.save(f"{tmp}/g.safetensors")
        lines = ["# Bad inputs and what dkgm_aug does with them", "",
                 "Generated by `python tests/bad_inputs.py docs/bad_inputs.md` from the rows that "
                 "`tests/test_bad_inputs.py` checks (one test each). Errors derive from `DKGMError` "
                 "(a `ValueError`); `DataError` is about images and datasets.", "",
                 "| input | what happens |", "|---|---|"]
        for row in rows(f"{tmp}/g.safetensors", model, tmp):
            ok, text = run(row)
            assert ok, (row[0], text)
            lines.append(f"| {row[0]} | {text.replace(tmp, '<tmp>').replace('|', '/')} |")
    open(sys.argv[1], "w").write("\n".join(lines) + "\n")
