"""Generation speed of the augmentation API, and the memory of wrapping a large dataset.

    python benchmarks/speed.py --generator fashion-mnist-tiny --out benchmarks/results/speed.md [--quick]

Measures, side by side in one run: synthetic images/s of ``DKGMAugment`` one image at a
time (what a CPU DataLoader worker does) and on collated batches (the batched path),
and the resident memory added by wrapping a 1,000,000-item dataset in
``BalancedDKGMDataset`` (labels only: no image is loaded).
"""
import argparse
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from dkgm_aug import BalancedDKGMDataset, DKGMAugment, load


def rate(fn, n_images: int, repeats: int) -> float:
    fn()                                       # warm-up (lazy load, allocator)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n_images * repeats / (time.perf_counter() - t)


class LabelsOnly(torch.utils.data.Dataset):
    """A dataset of ``n`` items whose images are never read (wrapping must not touch them)."""

    def __init__(self, n: int, n_classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, n_classes, (n,), generator=g)
        self.targets[: n // 2] = 0              # imbalanced: half the items in class 0

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        raise RuntimeError("wrapping must not load images")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def wrap_memory(n: int, generator: str) -> str:
    ds = LabelsOnly(n)
    before = rss_mib()
    t = time.perf_counter()
    wrapped = BalancedDKGMDataset(ds, generator=generator, sampling_strategy="auto", progress=False)
    secs = time.perf_counter() - t
    after = rss_mib()
    return (f"{n:,} real items + {wrapped.n_synthetic:,} synthetic: RSS +{after - before:.1f} MiB "
            f"(peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB), "
            f"{secs:.2f} s to build the index plan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="fashion-mnist-tiny")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--wrap-items", type=int, default=1_000_000)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--_wrap", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._wrap:                              # child process: a clean RSS baseline
        print(wrap_memory(args._wrap, args.generator))
        return 0
    if args.quick:
        args.batch_sizes, args.wrap_items = [8], 20_000
    torch.set_num_threads(args.threads)
    model = load(args.generator)
    c, (h, w) = model.channels, model.image_size
    aug = DKGMAugment(args.generator, seed=0)
    single = torch.randint(0, 256, (c, h, w), dtype=torch.uint8)
    lines = [f"Generator `{args.generator}` ({h}x{w}, steps {model.steps}), {platform.machine()} CPU, "
             f"{args.threads} torch thread(s), torch {torch.__version__}.", "",
             "| path | batch | synthetic images/s |", "|---|---|---|"]
    reps = 2 if args.quick else 10
    lines.append(f"| DKGMAugment per image (uint8 CHW) | 1 | {rate(lambda: aug(single), 1, reps * 4):.1f} |")
    print(lines[-1], flush=True)
    for bs in args.batch_sizes:
        batch = torch.randint(0, 256, (bs, c, h, w), dtype=torch.uint8)
        lines.append(f"| DKGMAugment batched (uint8 BCHW) | {bs} | {rate(lambda: aug(batch), bs, reps):.1f} |")
        print(lines[-1], flush=True)
    child = subprocess.run([sys.executable, __file__, "--_wrap", str(args.wrap_items), "--generator", args.generator],
                           capture_output=True, text=True, check=True)
    lines += ["", "Memory of `BalancedDKGMDataset(sampling_strategy='auto')` over a labels-only dataset: "
              + child.stdout.strip()]
    print(lines[-1])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
