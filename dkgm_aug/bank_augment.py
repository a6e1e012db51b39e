"""``BankAugment``: online augmentation at the price of a lookup, from a :class:`~dkgm_aug.bank.NeighbourBank`.

The twin of ``DKGMAugment`` (same inputs, same ``p``, same seeding, masks and labels pass through),
except that the neighbour is read from the bank instead of generated: each image is replaced, with
probability ``p``, by one of its ``k`` bank neighbours drawn at random. The bank finds an image's
row by a digest of its pixels (256 levels, shape included), so the transform must see the images
the bank was made from: put it first, before crops, flips or normalisation. An image the bank does
not hold raises a ``DataError`` at any ``p`` (``missing="keep"`` passes it through unchanged).

>>> bank = NeighbourBank(train_set, "fashion-mnist-tiny", k=8, path="bank.safetensors").build()  # doctest: +SKIP
>>> train_set.transform = v2.Compose([BankAugment(bank, p=0.5, seed=0), v2.RandomHorizontalFlip()])  # doctest: +SKIP
"""
import torch
from torchvision.transforms import v2

from . import cache as cache_file
from .bank import NeighbourBank
from .errors import DataError, DKGMError
from .images import tensor_unit, to_batch
from .transforms import DKGMAugment, SeedSource, batch_size, check_p

__all__ = ["BankAugment"]


class BankAugment(v2.Transform):
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
        return dict(apply=self.rng.rand(n) < self.p, pick=self.rng.seeds(n))

    def transform(self, inpt, params: dict):
        x01, restore = to_batch(inpt)
        apply = params["apply"]
        if len(apply) != len(x01):
            raise DKGMError(f"params were drawn for {len(apply)} images, the input has {len(x01)}")
        rows = [self.bank.row_of_digest(d) for d in cache_file.batch_digests(x01)]   # at any p: a stray image fails now
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
        out[todo] = tensor_unit(picks.to(out.device))     # one copy to the batch's device, not one per image
        return restore(out)

    def extra_repr(self) -> str:
        return f"k={self.bank.k}, rows={len(self.bank)}, p={self.p}, missing={self.missing!r}"
