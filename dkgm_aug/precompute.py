"""``dkgm-aug precompute``: write the synthetic set of a ``BalancedDKGMDataset``, or a neighbour bank,
as shards (:mod:`dkgm_aug.shards`), split over processes and machines (docs/scale.md).

    dkgm-aug precompute fashion-mnist-tiny --data fashion-mnist --rho 100 --out synth/
    dkgm-aug precompute fashion-mnist-tiny --data fashion-mnist --bank-k 8 --out bank/
    torchrun --nproc_per_node 8 -m dkgm_aug.cli precompute fashion-mnist-tiny --data fashion-mnist --out synth/

Process ``r`` of ``W`` writes shards ``r``, ``r + W``, ... Every row is a function of its item and
seed and every shard is generated in the same batches whatever ``W`` is, so any split writes the
same files, byte for byte, as one process (on the same hardware and thread count). ``W`` and ``r``
come from ``torch.distributed`` when it is initialised, else from torchrun's ``WORLD_SIZE`` and
``RANK`` (joining its process group: gloo on CPU, NCCL on CUDA, for a final check by rank 0), or
from those two variables alone (a job array, no process group). A rerun skips finished shards,
so a killed run resumes shard by shard. Load the result with
``BalancedDKGMDataset(<the same data>, generator, ...).load_cache(out)`` or
``NeighbourBank(<the same data>, generator, k=K, path=out)``.
"""
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import cache as cache_file
from . import shards
from ._validate import check_device, check_int
from .balanced import BalancedDKGMDataset
from .bank import NeighbourBank
from .errors import DKGMError
from .sampling import STRATEGIES
from .train.distributed import init_distributed

__all__ = ["precompute", "ranks"]


def ranks(device=None) -> tuple:
    """``(rank, world_size, joined)``: this process's share of the work, and whether it joined
    torchrun's process group here (and should leave it)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        raise DKGMError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} and RANK={os.environ.get('RANK')!r} must be "
                        "integers (torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise DKGMError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world}")
    if world > 1 and "MASTER_ADDR" in os.environ and dist.is_available():
        return (*init_distributed(device), True)
    return rank, world, False


def _by_source(target):
    """``target.source_digest``, read once per source item: a tail image is the source of up to rho
    synthetic rows, and a rerun compares every finished row with the data."""
    memo = {}

    def digest(j: int) -> bytes:
        source = int(target._sources[j])
        if source not in memo:
            memo[source] = target.source_digest(j)
        return memo[source]
    return digest


def _synthetic_rows(balanced: BalancedDKGMDataset, model, batch_size: int):
    """``make(start, stop)`` for synthetic items ``start .. stop - 1``, through the dataset's own path."""
    def make(start: int, stop: int) -> tuple:
        images, digests = [], []
        for b in range(start, stop, batch_size):
            js = list(range(b, min(b + batch_size, stop)))
            sources = [balanced.source_image(j) for j in js]
            qs, ds = balanced._make(js, sources, model)
            images, digests = images + qs, digests + ds
        if not images:
            return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, cache_file.DIGEST_BYTES, dtype=torch.uint8)
        return torch.stack(images), cache_file.digest_rows(digests)
    return make


def _device(device, world_size: int):
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(device)
    if device.type == "cuda" and device.index is None and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))   # one GPU per process
    return device


def precompute(ds, generator, out, *, bank_k=None, sampling_strategy="auto", alpha=None, steps=None, seed: int = 0,
               shard_size: int = 4096, batch_size: int = 256, device=None, dtype=None, compile: bool = False,
               progress: bool = True, info=None, after_shard=None) -> dict:
    """Write this process's shards of the synthetic set of ``BalancedDKGMDataset(ds, generator, ...)``,
    or, with ``bank_k``, of ``NeighbourBank(ds, generator, k=bank_k, ...)`` over every item, into the
    folder ``out``; skip the shards already there. ``dtype``, ``compile``: as in ``BalancedDKGMDataset``.
    Returns what was done (``complete`` is known only to rank 0 of a process group, after every rank
    has finished)."""
    shard_size, batch_size = check_int("shard_size", shard_size, 1), check_int("batch_size", batch_size, 1)
    rank, world, joined = ranks(device)
    try:
        device = _device(device, world)
        start = time.perf_counter()
        if bank_k is None:
            target = BalancedDKGMDataset(ds, generator, sampling_strategy, alpha, steps, seed=seed, cache=None,
                                         device=device, progress=False, dtype=dtype, compile=compile)
            kind, n_rows = "balanced", target.n_synthetic
            target._check_stable_sources()               # rows are made from one view of each source: warn if it varies
            make = _synthetic_rows(target, target._generator(), batch_size)
            source_digest = _by_source(target)
        else:
            target = NeighbourBank(ds, generator, bank_k, alpha=alpha, steps=steps, seed=seed, device=device,
                                   dtype=dtype, compile=compile)
            kind, n_rows, model = "bank", len(target), target._generator()
            make = lambda a, b: target.make_rows(a, b, model, batch_size)   # noqa: E731
            source_digest = target.source_digest          # one row per source
        done = shards.write_shards(Path(out), kind, target.fingerprint(), n_rows, shard_size, make, rank, world,
                                   progress=progress and (rank == 0 or not joined), info=info,
                                   after_shard=after_shard, source_digest=source_digest)
        done.update(kind=kind, rows=n_rows, rank=rank, world_size=world, seconds=time.perf_counter() - start,
                    complete=None)
        if world == 1 or dist.is_initialized():
            if dist.is_initialized():
                dist.barrier()
            if rank == 0:   # every shard there, intact, and made for this set
                done["complete"] = len(shards.Store(out, kind, target.fingerprint(), n_rows)) == n_rows
        return done
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def add_arguments(p) -> None:
    p.add_argument("generator", help="a checkpoint path or a shipped generator name")
    p.add_argument("--data", default=None, help="fashion-mnist, digits, a .npz or an image folder, loaded with the "
                   "--size and --channels the generator was trained with, if it recorded them, else as it is "
                   "(default: the data the generator was trained on)")
    p.add_argument("--split", default=None, help="the split of --data (default: as trained; fashion-mnist, digits: train)")
    p.add_argument("--limit", type=int, default=0,
                   help="use only the first N images (0: all, or as trained when --data is not given)")
    p.add_argument("--rho", type=float, default=None,
                   help="first take a long-tailed subset with imbalance ratio RHO (dkgm_aug.data.long_tailed_indices)")
    p.add_argument("--lt-seed", type=int, default=0, help="which images the long-tailed subset keeps")
    p.add_argument("--bank-k", type=int, default=None,
                   help="write a neighbour bank of K neighbours of every item instead of the synthetic set")
    p.add_argument("--sampling-strategy", default="auto", choices=STRATEGIES, help="which classes to fill")
    p.add_argument("--alpha", type=float, default=None, help="noise level (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None, help="stage-2 iterations (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="the plan and the noise seeds, as BalancedDKGMDataset(seed=)")
    p.add_argument("--shard-size", type=int, default=4096, help="rows per shard (the unit of resumption)")
    p.add_argument("--batch-size", type=int, default=256, help="images per generator call")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available, one GPU per process)")
    p.add_argument("--out", required=True, help="the folder of shards (on a shared filesystem for several machines)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args, data, spec: dict) -> None:
    """The command, on the loaded ``data`` (``spec``: how it was loaded, kept in the manifest)."""
    if args.rho is not None:
        from .data import long_tailed_indices
        data = data.subset(long_tailed_indices(data.targets, args.rho, args.lt_seed))
        spec = {**spec, "rho": args.rho, "lt_seed": args.lt_seed}
    bank_k = None if args.bank_k is None else check_int("--bank-k", args.bank_k, 1)
    done = precompute(data, args.generator, args.out, bank_k=bank_k, sampling_strategy=args.sampling_strategy,
                      alpha=args.alpha, steps=args.steps, seed=args.seed, shard_size=args.shard_size,
                      batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                      info=dict(data=spec, items=len(data)))
    who = f"rank {done['rank']} of {done['world_size']}: " if done["world_size"] > 1 else ""
    print(f"{who}wrote {done['written']} shard(s), skipped {done['skipped']} finished, of {done['mine']} "
          f"(the set: {done['rows']} {'bank rows' if bank_k else 'synthetic images'} in {done['shards']} shards) "
          f"in {done['seconds']:.1f} s", flush=True)
    if done["complete"]:
        print(f"{args.out} is complete", flush=True)
