"""Resident memory of a long DataLoader run over BalancedDKGMDataset + DKGMAugment.

    python benchmarks/dataloader_rss.py --generator digits-tiny --epochs 20 --workers 2 --ctx fork

Wraps a long-tailed split of the digits data (all of it ships with scikit-learn),
applies DKGMAugment(p=0.5) to every item, iterates with persistent workers and prints
the summed RSS of the main process and its workers after each epoch.
"""
import argparse
import functools
import multiprocessing
import os
import sys
import time

import torch

from dkgm_aug import BalancedDKGMDataset, DKGMAugment
from dkgm_aug.data import digits, long_tailed_indices


def record_pid(pids, worker_id: int) -> None:
    """``worker_init_fn``: each worker writes its process id into the shared array ``pids``."""
    pids[worker_id] = os.getpid()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="digits-tiny")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ctx", default="fork", choices=["fork", "spawn", "forkserver"])
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    train = digits("train")
    lt = train.subset(long_tailed_indices(train.targets, 10, 0))
    ds = BalancedDKGMDataset(lt, generator=args.generator, seed=0, progress=False,
                             transform=DKGMAugment(args.generator, p=0.5, seed=0))
    ctx = multiprocessing.get_context(args.ctx)
    worker_pids = ctx.Array("q", args.workers)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         persistent_workers=True, multiprocessing_context=ctx,
                                         worker_init_fn=functools.partial(record_pid, worker_pids))
    print(f"{len(ds)} items ({ds.n_synthetic} synthetic), {args.workers} {args.ctx} workers, "
          f"batch {args.batch_size}, {args.epochs} epochs")
    rss, start = [], time.time()
    for epoch in range(args.epochs):
        n = sum(len(x) for x, _ in loader)
        pids = [os.getpid(), *worker_pids]
        rss.append(sum(rss_mib(pid) for pid in pids))
        print(f"epoch {epoch + 1:>3}: {n} items, RSS main+workers {rss[-1]:.0f} MiB, {time.time() - start:.0f} s",
              flush=True)
    print(f"RSS after epoch 1: {rss[0]:.0f} MiB, after epoch 2: {rss[1]:.0f} MiB, "
          f"after epoch {args.epochs}: {rss[-1]:.0f} MiB (change from epoch 2: {rss[-1] - rss[1]:+.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
