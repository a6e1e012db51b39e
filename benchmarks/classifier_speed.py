"""Training images/s of the benchmark's classifier candidates on 28x28 gray images (why the
converged protocol uses a half-width resnet10t).

    OMP_NUM_THREADS=1 python benchmarks/classifier_speed.py --out benchmarks/results/classifier_speed.md
    python benchmarks/classifier_speed.py --quick --out /tmp/cs.md      # the test's dry run

Each row: forward, cross-entropy, backward and an Adam step on a random batch, timed over
``--steps`` steps after two warm-up steps.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import cpu_name, write_lines

CANDIDATES = (("resnet10t", None), ("resnet10t", (32, 64, 128, 256)))


def rate(name: str, channels, batch: int, steps: int) -> tuple:
    import timm
    model = timm.create_model(name, num_classes=10, in_chans=1, **({"channels": channels} if channels else {}))
    opt = torch.optim.Adam(model.parameters())
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start), sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="batch 8, one step")
    p.add_argument("--out", default="benchmarks/results/classifier_speed.md")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps = 8, 1
    torch.set_num_threads(args.threads)
    lines = [f"# Classifier training speed: `python benchmarks/classifier_speed.py {' '.join(argv)}`", "",
             f"28x28 gray, batch {args.batch}, {args.threads} torch thread(s), {cpu_name()}.", "",
             "| model | channels | parameters | images/s |", "|---|---|---|---|"]
    for name, channels in CANDIDATES:
        r, n = rate(name, channels, args.batch, args.steps)
        lines.append(f"| {name} | {channels or 'default'} | {n:,} | {r:.0f} |")
        print(lines[-1], flush=True)
    write_lines(Path(args.out), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
