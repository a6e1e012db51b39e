"""Train a larger Fashion-MNIST generator on a lent GPU within a time budget (issue 11), then
calibrate and score it with the evaluator, and leave everything under --out ($OUT on the
device machine).

    python benchmarks/gpu_generator.py --device cuda --preset small --batch-size 512 \
        --stage1-minutes 4 --stage2-minutes 3 --out "$OUT"           # about 8 minutes in all
    python benchmarks/gpu_generator.py --device cpu --quick --out /tmp/gpu   # the test's dry run

Each stage trains in chunks of ``--chunk`` steps until its time budget is spent (the trainer
resumes from its state file between chunks, so a kill loses at most a chunk); the checkpoint
records the steps actually done, the wall time and the command. Then ``calibrate`` picks the
default alpha and steps on training images, and the yardstick's scores of the result are
written to ``quality.csv``.

It also runs on a CPU (``--device cpu``), and fine-tunes: ``--init GEN --conditional
--conditional-stages 1 --stage2-minutes 0`` turns an unconditional generator into a
class-conditional one (a label embedding in stage 1, warm-started so that it begins as the same
function) and keeps its stage 2. A stage given 0 minutes is not trained.
"""
import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

import torch

from dkgm_aug import DKGM, Trainer
from dkgm_aug.calibrate import ALPHAS, STEPS, calibrate
from dkgm_aug.checkpoint import load
from dkgm_aug.data import load_dataset
from dkgm_aug.features import features, neighbour_quality
from dkgm_aug.images import from_model, to_model
from dkgm_aug.kernels import noise_from_seeds
from dkgm_aug.label_filter import load_evaluator


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist",
                   help="a shipped dataset name or an .npz (e.g. a long-tailed split from imbalanced.py --export-split)")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr (larger batch than the paper's 3e-4 setting)")
    p.add_argument("--stage1-minutes", type=float, default=4.0)
    p.add_argument("--stage2-minutes", type=float, default=3.0)
    p.add_argument("--stage1-steps", type=int, default=None,
                   help="stop stage 1 after this many steps even with time left (a fixed budget, e.g. for a control run)")
    p.add_argument("--stage2-steps", type=int, default=None, help="the same for stage 2")
    p.add_argument("--chunk", type=int, default=200, help="steps between time checks (and state saves)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--evaluator", default=None, help="default: <data>-evaluator (required for an .npz)")
    p.add_argument("--name", default=None, help="checkpoint stem (default: <data>-<preset>-gpu)")
    p.add_argument("--n", type=int, default=1000, help="training images for calibration and scoring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None,
                   help="start from this generator's weights (a path or shipped name) instead of a fresh --preset")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional: a label embedding in the stages of --conditional-stages (with --init, "
                        "the unconditional weights are the warm start: the model starts as the same function)")
    p.add_argument("--conditional-stages", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    p.add_argument("--calibrate-alphas", type=float, nargs="+", default=None,
                   help="the alpha grid of the calibration (default: dkgm_aug.calibrate.ALPHAS)")
    p.add_argument("--calibrate-steps", type=int, nargs="+", default=None,
                   help="the stage-2 steps grid of the calibration (default: dkgm_aug.calibrate.STEPS)")
    p.add_argument("--quick", action="store_true", help="digits (or the given .npz), tiny, a few steps: the test's dry run")
    p.add_argument("--out", default="runs/gpu_generator")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.batch_size, args.chunk, args.n = "tiny", 32, 2, 64
        args.data = args.data if args.data.endswith(".npz") else "digits"
        args.stage1_minutes, args.stage2_minutes = (min(m, 0.001) for m in (args.stage1_minutes, args.stage2_minutes))
    return args


def train_for(trainer: Trainer, stage: int, minutes: float, chunk: int, cap=None) -> int:
    """Train ``stage`` in chunks until ``minutes`` have passed or ``cap`` steps are done; returns
    the steps done."""
    deadline, step = time.time() + 60 * minutes, 0
    while True:
        step = step + chunk if cap is None else min(step + chunk, cap)
        trainer.fit(stage, max_steps=step)
        if time.time() >= deadline or step == cap:
            return step


def build(args, train) -> DKGM:
    """The model to train: a fresh ``--preset``, or ``--init``'s weights (its calibration dropped);
    with ``--conditional``, one label per class of the data in ``--conditional-stages``."""
    torch.manual_seed(args.seed)
    n_classes = len(train.classes) if args.conditional else 0
    stages = tuple(args.conditional_stages)
    if not args.init:
        return DKGM.from_preset(args.preset, image_size=tuple(train.images.shape[-2:]), channels=train.images.shape[1],
                                num_classes=n_classes, conditional_stages=stages)
    model = load(args.init)
    if not isinstance(model, DKGM):
        raise SystemExit(f"--init must be a DKGM generator, got {type(model).__name__}")
    model.info = {k: v for k, v in model.info.items() if k != "calibration"}
    model.info["init"] = str(args.init)
    return model.with_labels(n_classes, stages=stages) if n_classes else model


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    npz = args.data.endswith(".npz")
    train = load_dataset(args.data, **({} if npz else dict(split="train")))
    model = build(args, train)
    steps, start = {}, time.time()
    data = torch.utils.data.TensorDataset(train.images, train.targets) if model.conditional else train.images
    for stage, minutes in ((1, args.stage1_minutes), (2, args.stage2_minutes)):
        if minutes <= 0:          # kept as it is (e.g. the warm start's stage 2)
            steps[stage] = 0
            continue
        trainer = Trainer(model, data, out_dir=out / "work", batch_size=args.batch_size, max_steps=args.chunk,
                          lr=args.lr, seed=args.seed, device=args.device, save_every=args.chunk, progress=False)
        steps[stage] = train_for(trainer, stage, minutes, args.chunk, getattr(args, f"stage{stage}_steps"))
        print(f"stage {stage}: {steps[stage]} steps x {args.batch_size} in {trainer.elapsed.get(stage, 0):.0f} s",
              flush=True)
    model = model.float().eval()
    name = out / f"{args.name or Path(args.data).stem + '-' + args.preset + '-gpu'}.safetensors"
    training = dict(
        command="python benchmarks/gpu_generator.py " + " ".join(map(shlex.quote, argv)),
        data=train.description, data_spec=dict(data=args.data, **({} if npz else dict(split="train"))),
        stage1_steps=steps[1], stage2_steps=steps[2], batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=str(args.device), wall_time_s=round(time.time() - start, 1), torch_version=torch.__version__,
        hardware=torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu")
    model.save(name, training=training, classes=list(train.classes))   # kept even if a deadline stops what follows
    print(f"wrote {name} (not calibrated yet)", flush=True)
    evaluator = load_evaluator(args.evaluator or f"{args.data}-evaluator")
    grid = dict(alphas=args.calibrate_alphas or ALPHAS, steps=args.calibrate_steps or STEPS)
    record = calibrate(model, train, evaluator, n=args.n, seed=args.seed, **grid)   # on --device
    write_quality(model, train, evaluator, args, out / "quality.csv")
    model.save(name)      # now with the calibrated alpha and steps
    print(f"wrote {name}: alpha {record['alpha']:g}, steps {record['steps']} (calibrated); scores in quality.csv")
    return 0


@torch.inference_mode()
def write_quality(model, train, evaluator, args, path: Path) -> None:
    """Stage 1 and stage 1+2 scores at the calibrated knobs next to the real images'."""
    g = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randperm(len(train), generator=g)[: args.n]
    x01, labels = train.images[idx].float() / 255, train.targets[idx]
    ref = features(evaluator, train.images[torch.randperm(len(train), generator=g)[: args.n]].float() / 255)
    x = to_model(x01).to(next(model.parameters()).device)
    eps = noise_from_seeds([args.seed * 1_000_003 + i for i in range(len(x))], x.shape[1:], model.kernel,
                           x.device, x.dtype)
    s1, s12 = (s.cpu() for s in model.sample(x, eps=eps, return_stages=True, labels=labels.to(x.device)))
    rows = [dict(what="real sources", **neighbour_quality(evaluator, x01, labels, ref)),
            dict(what="stage 1", **neighbour_quality(evaluator, from_model(s1), labels, ref)),
            dict(what="stage 1+2", **neighbour_quality(evaluator, from_model(s12), labels, ref))]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
