"""The trainer's images/s next to the U-Net's raw forward+backward+step at the same batch (issue 11).

    OMP_NUM_THREADS=1 python benchmarks/trainer_overhead.py --out benchmarks/results/trainer_overhead.md
    python benchmarks/trainer_overhead.py --quick --out /tmp/to.md        # the test's dry run

"raw" is the least a training step can cost: the model's loss, backward and an Adam step on
a batch already in model range, nothing else. "Trainer" is ``Trainer.fit`` on the same
images (uint8 in memory, seeded batches, EMA, gradient clipping, the loss check, the CSV log
every 10 steps) without files (``out_dir=None``), then with its files (state and samples
written once at the end). The ratio is what the trainer costs on top of the network.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_name, write_lines
from dkgm_aug import DKGM, Trainer
from dkgm_aug.data import load_dataset
from dkgm_aug.images import to_model


def raw_rate(model, images, stage: int, batch: int, steps: int) -> float:
    """Images/s of loss + backward + Adam on the stage's network alone."""
    net = model.stage_module(stage)
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for i in range(steps):
        x = to_model(images[(i * batch) % (len(images) - batch):][:batch].float() / 255)
        loss = model(x, stage=stage, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def trainer_rate(model, images, stage: int, batch: int, steps: int, out_dir) -> float:
    trainer = Trainer(model, images, out_dir=out_dir, batch_size=batch, max_steps=steps, progress=False,
                      save_every=10 ** 9, resume=False)
    start = time.perf_counter()
    trainer.fit(stage)
    return steps * batch / (time.perf_counter() - start)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, nargs=2, default=[60, 12], help="timed steps for stage 1 and stage 2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="digits, 3 steps per stage")
    p.add_argument("--out", default="benchmarks/results/trainer_overhead.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = "digits" if args.quick else "fashion-mnist"
    steps = (3, 3) if args.quick else tuple(args.steps)
    images = load_dataset(data).images[:4096]
    lines = [f"# Trainer overhead: `python benchmarks/trainer_overhead.py {' '.join(argv)}`", "",
             f"{data}, preset {args.preset}, batch {args.batch}, {args.threads} torch thread(s), {cpu_name()}; "
             "each rate after one warm-up run of the same kind.", "",
             "| stage | raw images/s | Trainer, no files | Trainer, with files | raw / Trainer (no files) |",
             "|---|---|---|---|---|"]
    for stage, n in zip((1, 2), steps):
        torch.manual_seed(0)
        model = DKGM.from_preset(args.preset, image_size=tuple(images.shape[-2:]), channels=images.shape[1])
        raw_rate(model, images, stage, args.batch, 1)                        # warm-up
        raw = raw_rate(model, images, stage, args.batch, n)
        trainer_rate(model, images, stage, args.batch, 1, None)              # warm-up
        plain = trainer_rate(model, images, stage, args.batch, n, None)
        with tempfile.TemporaryDirectory() as tmp:
            files = trainer_rate(model, images, stage, args.batch, n, tmp)
        lines.append(f"| {stage} | {raw:.0f} | {plain:.0f} | {files:.0f} | {raw / plain:.2f} |")
        print(lines[-1], flush=True)
    write_lines(Path(args.out), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
