"""Training throughput (images/s) of each DKGM stage per preset, on this machine.

    python benchmarks/throughput.py --presets tiny --sizes 28 8 --threads 1 --out benchmarks/results/throughput.md
"""
import argparse
import platform
import time
from pathlib import Path

import torch

from dkgm_aug import DKGM


def measure(preset: str, size: int, stage: int, batch_size: int, iters: int, warmup: int = 2) -> float:
    torch.manual_seed(0)
    model = DKGM.from_preset(preset, image_size=size, channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    x = torch.rand(batch_size, 1, size, size) * 2 - 1
    for i in range(warmup + iters):
        if i == warmup:
            start = time.perf_counter()
        loss = model(x, stage=stage)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch_size * iters / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny"])
    p.add_argument("--sizes", nargs="+", type=int, default=[28, 8])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"Training throughput, batch {args.batch_size}, {args.iters} timed steps after 2 warm-up steps, "
             f"{platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}.", "",
             "| preset | image size | stage | images/s |", "|---|---|---|---|"]
    for preset in args.presets:
        for size in args.sizes:
            for stage in (1, 2):
                rate = measure(preset, size, stage, args.batch_size, args.iters)
                lines.append(f"| {preset} | {size}x{size} | {stage} | {rate:.0f} |")
                print(lines[-1], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
