"""``BankAugment``: online augmentation at the price of a lookup, from a :class:`~dkgm_aug.bank.NeighbourBank`.

The twin of ``DKGMAugment`` (same inputs, same ``p``, same seeding, masks and labels pass through),
except that the neighbour is read from the bank instead of generated: each image is replaced, with
probability ``p``, by one of its ``k`` bank neighbours drawn at random. The bank finds an image's
row by a digest of its pixels (256 levels, shape included), so the transform must see the images
the bank was made from: put it first, before crops, flips or normalisation. An image the bank does
not hold raises a ``DataError`` at any ``p`` (``missing="keep"`` passes it through unchanged).
When the bank's neighbours depend on labels (a class-conditional generator, a per-class
kernel-smoothed score, a label filter), a sample's label, if it carries one (``aug(img, label)``,
``aug(x, y)``, a dict's ``label`` key), must be the one the bank made that image's neighbours with,
else a ``DataError`` (the data were relabelled after the bank was made); and identical images
that the bank holds under different labels need it, to tell their rows apart.

>>> bank = NeighbourBank(train_set, "fashion-mnist-tiny", k=8, path="bank.safetensors").build()  # doctest: +SKIP
>>> train_set.transform = v2.Compose([BankAugment(bank, p=0.5, seed=0), v2.RandomHorizontalFlip()])  # doctest: +SKIP
"""
from collections.abc import Mapping

import numpy as np
import torch
from torchvision.transforms import v2

from . import cache as cache_file
from .bank import NeighbourBank
from .errors import DataError, DKGMError
from .images import tensor_unit, to_batch
from .transforms import _SAMPLE, LABEL_KEYS, DKGMAugment, KeepsSample, SeedSource, batch_size, check_p

__all__ = ["BankAugment"]


class BankAugment(KeepsSample, v2.Transform):
    """Replace each image, with probability ``p``, by one of its ``k`` neighbours in ``bank``.

    ``seed``: ``None`` (torch's global RNG), an int, or a ``torch.Generator``, as in
    ``DKGMAugment``. ``missing``: ``"error"`` (an image the bank does not hold raises) or
    ``"keep"`` (it passes through). The bank is built on first use if it is not yet, but never
    in a DataLoader worker: build it before the DataLoader starts.
    """

    _transformed_types = DKGMAugment._transformed_types

    def __init__(self, bank, p: float = 0.5, seed=None, missing: str = "error"):
        super().__init__()
        if not isinstance(bank, NeighbourBank):
            raise DKGMError(f"bank must be a dkgm_aug.NeighbourBank, got {type(bank).__name__}")
        if missing not in ("error", "keep"):
            raise DKGMError(f"missing must be 'error' or 'keep', got {missing!r}")
        self.bank, self.p, self.missing, self.rng = bank, check_p(p), missing, SeedSource(seed)

    def make_params(self, flat_inputs) -> dict:
        n = batch_size(flat_inputs[0]) if flat_inputs else 1
        return dict(apply=self.rng.rand(n) < self.p, pick=self.rng.seeds(n),
                    labels=_class_labels(_SAMPLE.get(), n) if self.bank.uses_labels else None)

    def transform(self, inpt, params: dict):
        x01, restore = to_batch(inpt)
        apply = params["apply"]
        if len(apply) != len(x01):
            raise DKGMError(f"params were drawn for {len(apply)} images, the input has {len(x01)}")
        # at any p: a stray image, or a label the bank did not make the image's neighbours with, fails now
        rows = self._rows(cache_file.batch_digests(x01), params.get("labels"))
        if self.missing == "error" and None in rows:
            i = rows.index(None)
            raise DataError(f"image {i} of the input (shape {tuple(x01.shape[1:])}) is not in the neighbour bank: "
                            "the bank knows its images by their pixels, so BankAugment must come before any "
                            "transform that changes them (crops, flips, Normalize); or pass missing='keep'")
        todo = [i for i, (a, r) in enumerate(zip(apply.tolist(), rows)) if a and r is not None]
        if not todo:
            return inpt
        picks = torch.stack([self.bank.neighbour(rows[i], params["pick"][i] % self.bank.k) for i in todo])
        out = x01.clone()
        out[todo] = tensor_unit(picks.to(out.device), check=False)   # the bank's own uint8: one copy, no checks
        return restore(out, todo)

    def _rows(self, digests: list, labels) -> list:
        """Each image's bank row (None: not in the bank). When the rows depend on labels, a class label
        the sample carries (``labels``: one per image, or None) must be the row's, and picks the row of
        identical images held under several classes (which, without one, are refused)."""
        candidates = [self.bank.rows_of_digest(d) for d in digests]
        if not self.bank.uses_labels or (labels is None and all(len(c) < 2 for c in candidates)):
            return [c[0] if c else None for c in candidates]
        row_labels = self.bank.row_labels()
        rows = []
        for i, c in enumerate(candidates):
            classes = [row_labels[r] for r in c]
            if labels is not None and c and None not in classes:
                c = [r for r, y in zip(c, classes) if y == labels[i]]
                if not c:
                    raise DataError(f"image {i} has label {labels[i]!r}, but the neighbour bank made its neighbours "
                                    f"for class {classes[0]!r}: the data were relabelled after the bank was made; "
                                    "build the bank again from the relabelled data")
            elif len(set(classes)) > 1:
                raise DataError(f"image {i} is in the neighbour bank under several classes ({sorted(map(repr, set(classes)))}: "
                                "identical images with different labels), and its neighbours depend on the class: "
                                "pass its label with it, aug(img, label), aug(x, y) or a dict's 'label'")
            rows.append(c[0] if c else None)
        return rows

    def extra_repr(self) -> str:
        return f"k={self.bank.k}, rows={len(self.bank)}, p={self.p}, missing={self.missing!r}"


def _class_labels(sample, n: int):
    """The class label of each of the ``n`` images when the sample names one plainly, else None: a
    dict's value under one label key, or the second of an ``(image, label)`` pair; an int or a
    string per image (a 0-d or 1-D integer tensor or array, or a list). Anything else (an index
    beside the label, a float weight) is no label: the bank then checks nothing it cannot read."""
    if isinstance(sample, Mapping):
        found = [sample[k] for k in LABEL_KEYS if k in sample]
        value = found[0] if len(found) == 1 else None
    elif isinstance(sample, (tuple, list)) and len(sample) == 2:
        value = sample[1]
    else:
        return None
    if isinstance(value, np.ndarray):
        if value.ndim > 1 or value.dtype.kind not in "iuU":
            return None
        value = value.reshape(-1).tolist()
    elif isinstance(value, torch.Tensor):
        if value.ndim > 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            return None
        value = value.reshape(-1).tolist()
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    if len(values) != n or not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in values):
        return None
    return values
