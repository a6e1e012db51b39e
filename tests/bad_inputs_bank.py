"""Bad-input rows of NeighbourBank, BankAugment, bank mode and precompute (see bad_inputs.py for the form)."""
import os
from pathlib import Path

import torch

from dkgm_aug import BalancedDKGMDataset, BankAugment, DataError, DKGMError, NeighbourBank
from dkgm_aug.precompute import precompute


class Pixels(torch.utils.data.Dataset):
    """Distinct 8x8 gray images, labels 0, 0, 0, 1."""

    def __init__(self):
        self.images = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        self.targets = [0, 0, 0, 1]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def _other_k(ckpt, folder: Path):
    NeighbourBank(Pixels(), ckpt, k=2, path=folder / "bank.safetensors").build(progress=False)
    return NeighbourBank(Pixels(), ckpt, k=3, path=folder / "bank.safetensors")


def _other_shard_size(ckpt, folder: Path):
    precompute(Pixels(), ckpt, folder / "s1", bank_k=1, shard_size=2, progress=False)
    precompute(Pixels(), ckpt, folder / "s1", bank_k=1, shard_size=3, progress=False)


def _incomplete(ckpt, folder: Path):
    precompute(Pixels(), ckpt, folder / "s2", sampling_strategy={1: 7}, shard_size=2, progress=False)
    (folder / "s2" / "shard-00001-of-00003.safetensors").unlink()
    return BalancedDKGMDataset(Pixels(), ckpt, sampling_strategy={1: 7}, progress=False).load_cache(folder / "s2")


def _bank_as_synthetic(ckpt, folder: Path):
    precompute(Pixels(), ckpt, folder / "s3", bank_k=1, progress=False)
    return BalancedDKGMDataset(Pixels(), ckpt, progress=False).load_cache(folder / "s3")


def _rank(ckpt, folder: Path):
    old = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK="2", WORLD_SIZE="2")
    try:
        return precompute(Pixels(), ckpt, folder / "s4", progress=False)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _flipped(ckpt):
    bank = NeighbourBank(Pixels(), ckpt, k=1).build(progress=False)
    return BankAugment(bank, p=0.0)(Pixels().images[0].flip(-1))


def _conditional_bank(twins: bool):
    """A class-conditional bank over Pixels, or over Pixels with image 0 again under class 1."""
    from dkgm_aug import DKGM
    items = [Pixels()[i] for i in range(4)] + ([(Pixels().images[0], 1)] if twins else [])
    return NeighbourBank(items, DKGM.from_preset("tiny", image_size=8, channels=1, num_classes=2, steps=1).eval(),
                         k=1).build(progress=False)


def rows(ckpt, model, tmp):
    folder = Path(tmp) / "bank"
    folder.mkdir(exist_ok=True)
    (folder / "plain-file").write_text("")
    return [
        ("bank: k = 0", lambda: NeighbourBank(Pixels(), ckpt, k=0), (DKGMError, "k (neighbours per image) must be")),
        ("bank: BalancedDKGMDataset(bank=0)", lambda: BalancedDKGMDataset(Pixels(), ckpt, bank=0, progress=False),
         (DKGMError, "bank (neighbours per source image) must be")),
        ("bank: BalancedDKGMDataset(bank='8')", lambda: BalancedDKGMDataset(Pixels(), ckpt, bank="8", progress=False),
         (DKGMError, "an integer k >= 1 or a NeighbourBank")),
        ("bank: indices outside the dataset", lambda: NeighbourBank(Pixels(), ckpt, indices=[0, 9]),
         (DataError, "indices must lie in [0, 4)")),
        ("bank: a file made with another k", lambda: _other_k(ckpt, folder), (DKGMError, "differs in ['k'")),
        ("bank: path is a file without .safetensors", lambda: NeighbourBank(Pixels(), ckpt, path=folder / "plain-file"),
         (DKGMError, "a file without .safetensors")),
        ("bank: a shared bank made with another alpha",
         lambda: BalancedDKGMDataset(Pixels(), ckpt, alpha=0.9, progress=False,
                                     bank=NeighbourBank(Pixels(), ckpt, k=1).build(progress=False)),
         (DKGMError, "made with another alpha")),
        ("bank: BankAugment given no bank", lambda: BankAugment("bank.safetensors"), (DKGMError, "NeighbourBank")),
        ("bank: BankAugment after a flip (image not in the bank)", lambda: _flipped(ckpt),
         (DataError, "must come before any transform")),
        ("bank: BankAugment given a label other than the conditional bank's (data relabelled)",
         lambda: BankAugment(_conditional_bank(False), p=0.0)(Pixels().images[3], 0), (DataError, "relabelled")),
        ("bank: BankAugment, no label, an image the conditional bank holds under two classes",
         lambda: BankAugment(_conditional_bank(True), p=0.0)(Pixels().images[0]), (DataError, "several classes")),
        ("bank: set_epoch(-1)", lambda: BalancedDKGMDataset(Pixels(), ckpt, bank=1, progress=False).set_epoch(-1),
         (DKGMError, "epoch must be an integer >= 0")),
        ("precompute: shard_size = 0", lambda: precompute(Pixels(), ckpt, folder / "s0", shard_size=0),
         (DKGMError, "shard_size must be an integer >= 1")),
        ("precompute: rerun into a folder of another shard size", lambda: _other_shard_size(ckpt, folder),
         (DKGMError, "differs in ['shard_size']); delete the folder")),
        ("precompute: RANK >= WORLD_SIZE", lambda: _rank(ckpt, folder), (DKGMError, "RANK must be in [0, WORLD_SIZE)")),
        ("precompute: loading a folder with a shard missing", lambda: _incomplete(ckpt, folder),
         (DKGMError, "lacks 1 of its 3 shards")),
        ("precompute: loading a bank folder as a synthetic set", lambda: _bank_as_synthetic(ckpt, folder),
         (DKGMError, "holds a neighbour bank, not the synthetic set")),
    ]
