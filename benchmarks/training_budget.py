"""How much training is enough: generator quality against training images seen (issue 11).

    OMP_NUM_THREADS=1 nohup python benchmarks/training_budget.py --preset tiny \
        --out benchmarks/results/training_budget > runs/budget_tiny.log 2>&1 &
    python benchmarks/training_budget.py --quick --out /tmp/budget     # the test's dry run

Stage 1 trains on all of the training split and is scored after each milestone (images seen)
on its own output, the clamped KDE neighbour ``f_theta(x + alpha eps)``; then stage 2 trains
(on blurred real images: it never sees stage 1) and the full pipeline, stage 1+2, is scored
after each of its milestones. The scores come from the evaluator classifier
(``benchmarks/train_evaluator.py``, the one yardstick): label preservation of ``--n`` training
sources' neighbours at the model's alpha (fixed noise seeds, so the curves compare like with
like), Frechet distance to ``--n`` real test images in the evaluator's features, and sharpness.
The real rows (training sources themselves, held-out test images) calibrate them.

Rows are appended to ``budget_<preset>.csv`` as milestones finish; a rerun skips finished
milestones and the trainer resumes from its state, so the job survives kills. The model at
every milestone is kept (``work_<data>_<preset>/snapshots/``), so ``--rescore`` can score them
all again with another evaluator without training. The final model is written to
``<out>/<data>-<preset>-budget.safetensors``.
"""
import argparse
import csv
import shlex
import sys
from pathlib import Path

import torch

import dkgm_aug
from dkgm_aug import DKGM, Trainer
from dkgm_aug.data import load_dataset
from dkgm_aug.features import accuracy, features, load_feature_net, neighbour_quality
from dkgm_aug.images import from_model, to_model
from dkgm_aug.kernels import noise_from_seeds

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["preset", "stage", "step", "images_seen", "train_seconds", "sharpness", "frechet_distance",
          "label_preservation"]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--stage1-milestones", type=int, nargs="+", default=[64, 256, 1000, 2000, 4000])
    p.add_argument("--stage2-milestones", type=int, nargs="+", default=[32, 125, 250, 500])
    p.add_argument("--stage2-batch-size", type=int, default=64)
    p.add_argument("--n", type=int, default=500, help="sources scored per milestone")
    p.add_argument("--evaluator", default=None, help="default: results/evaluator_<data>.safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rescore", action="store_true", help="score the kept snapshots again (e.g. with a new "
                   "--evaluator) into a fresh CSV; no training")
    p.add_argument("--plot", action="store_true", help="only draw budget_<preset>.png from the CSV")
    p.add_argument("--quick", action="store_true", help="digits, a few steps, for the test suite")
    p.add_argument("--out", default=str(RESULTS / "training_budget"))
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.n = "digits", 64
        args.stage1_milestones, args.stage2_milestones = [2, 4], [2]
    args.evaluator = args.evaluator or str(RESULTS / f"evaluator_{args.data}.safetensors")
    return args


def done_rows(path: Path) -> set:
    if not path.exists():
        return set()
    with open(path) as f:
        return {(r["stage"], int(r["step"])) for r in csv.DictReader(f)}


def append(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


@torch.inference_mode()
def pipeline(model: DKGM, x: torch.Tensor, seed: int):
    """(stage 1, stage 1+2) outputs for sources ``x`` in [-1, 1], with fixed per-image noise."""
    seeds = [seed * 1_000_003 + i for i in range(len(x))]
    eps = noise_from_seeds(seeds, x.shape[1:], model.kernel, x.device, x.dtype)
    return model.sample(x, eps=eps, return_stages=True)


def plot(csv_path: Path, png: Path) -> None:
    """Each score against training images seen, one line per stage, the real images' level dashed."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(csv_path)))
    keys = ("label_preservation", "frechet_distance", "sharpness")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key in zip(axes, keys):
        for stage in ("stage 1", "stage 2"):
            pts = [(int(r["images_seen"]), float(r[key])) for r in rows if r["stage"] == stage]
            if pts:
                ax.plot(*zip(*pts), marker="o", label="stage 1 alone" if stage == "stage 1" else "stage 1+2")
        real = [float(r[key]) for r in rows if r["stage"] == "real"]
        if real:
            ax.axhline(real[0], ls="--", color="gray", label="real training images")
        ax.set(xscale="log", xlabel="training images seen (that stage)", title=key.replace("_", " "))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if key == "frechet_distance":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, work = out / f"budget_{args.preset}.csv", out / f"work_{args.data}_{args.preset}"
    if args.plot:
        plot(csv_path, out / f"budget_{args.preset}.png")
        return 0
    snapshots = work / "snapshots"
    train, test = load_dataset(args.data, split="train"), load_dataset(args.data, split="test")
    net = load_feature_net(args.evaluator)
    g = torch.Generator().manual_seed(args.seed)
    n = min(args.n, len(test) // 2)
    src, tst = torch.randperm(len(train), generator=g)[:n], torch.randperm(len(test), generator=g)[:2 * n]
    sources, labels = to_model(train.images[src].float() / 255), train.targets[src]
    ref = features(net, test.images[tst[:n]])
    if args.rescore:
        old = list(csv.DictReader(open(csv_path))) if csv_path.exists() else []
        csv_path.unlink(missing_ok=True)
    done = done_rows(csv_path)
    if ("real", 0) not in done:
        for name, imgs, ys in (("real", train.images[src], labels), ("held-out", test.images[tst[n:]],
                                                                      test.targets[tst[n:]])):
            q = neighbour_quality(net, imgs.float() / 255, ys, ref)
            append(csv_path, dict(preset=args.preset, stage=name, step=0, images_seen=0, train_seconds=0, **q))
        print(f"evaluator test accuracy {accuracy(net, test):.4f}", flush=True)

    def score(model, stage, step, batch, seconds):
        s1, s12 = pipeline(model, sources, args.seed + 1)
        q = neighbour_quality(net, from_model(s1 if stage == 1 else s12), labels, ref)
        append(csv_path, dict(preset=args.preset, stage=f"stage {stage}", step=step, images_seen=step * batch,
                              train_seconds=round(seconds, 1), **q))
        print(f"stage {stage} step {step} ({step * batch} images): " +
              ", ".join(f"{k} {v:.4f}" for k, v in q.items()), flush=True)

    if args.rescore:
        for r in old:
            if r["stage"].startswith("stage"):
                model = dkgm_aug.load(snapshots / f"{r['stage'].replace(' ', '')}_step{r['step']}.safetensors")
                score(model, int(r["stage"][-1]), int(r["step"]), int(r["images_seen"]) // int(r["step"]),
                      float(r["train_seconds"]))
        return 0

    torch.manual_seed(args.seed)
    model = DKGM.from_preset(args.preset, image_size=tuple(train.images.shape[-2:]), channels=train.images.shape[1])
    elapsed = {}
    for stage, milestones, batch in ((1, args.stage1_milestones, args.batch_size),
                                     (2, args.stage2_milestones, args.stage2_batch_size)):
        trainer = Trainer(model, train.images, out_dir=work, batch_size=batch, max_steps=max(milestones),
                          seed=args.seed, save_every=min(milestones), progress=False)
        for step in milestones:
            finished = (f"stage {stage}", step) in done
            if finished and step < max(milestones):   # a rerun: its state is already further on
                continue
            trainer.fit(stage, max_steps=step)
            elapsed[stage] = trainer.elapsed.get(stage, 0.0)
            if not finished:
                model.save(snapshots / f"stage{stage}_step{step}.safetensors")
                score(model, stage, step, batch, elapsed[stage])
    model.save(out / f"{args.data}-{args.preset}-budget.safetensors", training=dict(
        command="python benchmarks/training_budget.py " + " ".join(map(shlex.quote, argv)),
        data=train.description, data_spec=dict(data=args.data, split="train"),
        stage1_steps=max(args.stage1_milestones), stage2_steps=max(args.stage2_milestones),
        batch_size={1: args.batch_size, 2: args.stage2_batch_size}, seed=args.seed,
        wall_time_s=round(sum(elapsed.values()), 1)), classes=list(train.classes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
