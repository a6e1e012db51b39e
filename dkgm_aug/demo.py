"""The main job of the README's first command: a long-tailed Fashion-MNIST split balanced
with the shipped generator.

    python -m dkgm_aug.demo --out demo_out          # also: dkgm-aug demo

Prints the class counts before and after ``BalancedDKGMDataset(sampling_strategy="auto")``
and the time per synthetic image (one at a time, and batched), and writes
``demo_out/neighbours.png``: one real training image per class beside its KDE
neighbours at alpha 0.25, 0.5 and 1.0.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from ._validate import check_float, check_int
from .augment import generate, load_generator
from .balanced import BalancedDKGMDataset
from .data import fashion_mnist, long_tailed_indices
from .errors import DataError

ALPHAS = (0.25, 0.5, 1.0)


def neighbour_figure(model, ds, path, per_alpha: int = 3, seed: int = 0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first = [int(torch.nonzero(ds.targets == c)[0]) for c in range(len(ds.classes))]
    real = torch.stack([ds[i][0] for i in first])
    cols = [("real", real)]
    for a in ALPHAS:
        for k in range(per_alpha):
            seeds = [seed * 1000 + 100 * k + i for i in range(len(real))]
            cols.append((f"alpha {a}", generate(model, real, seeds, alpha=a)))
    fig, axes = plt.subplots(len(real), len(cols), figsize=(len(cols) * 0.9, len(real) * 0.95))
    for r in range(len(real)):
        for c, (title, imgs) in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(imgs[r, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0 and (c == 0 or (c - 1) % per_alpha == 0):
                ax.set_title(title, fontsize=8, loc="left")
            if c == 0:
                ax.set_ylabel(ds.classes[r], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("Fashion-MNIST: real training images and DKGM KDE neighbours", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options, on ``p`` (this module's own parser, or ``dkgm-aug demo``)."""
    p.add_argument("--generator", default="fashion-mnist-tiny", help="a shipped generator name or a checkpoint")
    p.add_argument("--rho", type=float, default=100.0, help="imbalance ratio of the long-tailed split")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the noise")
    p.add_argument("--timed", type=int, default=64, help="synthetic images to time")
    p.add_argument("--out", default="demo_out", help="folder for neighbours.png")
    return p


def run(args: argparse.Namespace) -> int:
    check_int("--timed", args.timed, 1)
    check_float("--rho", args.rho, 1)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from exc

    train = fashion_mnist(split="train")
    lt = train.subset(long_tailed_indices(train.targets, args.rho, args.seed))
    balanced = BalancedDKGMDataset(lt, generator=args.generator, sampling_strategy="auto", seed=args.seed,
                                   cache=None)
    print(f"Fashion-MNIST train, long-tailed with imbalance ratio {args.rho:g} (seed {args.seed}), "
          f"balanced with '{args.generator}':")
    print(f"  {'class':<12} {'before':>7} {'after':>7}")
    for c, name in enumerate(lt.classes):
        print(f"  {name:<12} {balanced.class_counts_before[c]:>7} {balanced.class_counts[c]:>7}")
    print(f"  {'total':<12} {balanced.n_real:>7} {len(balanced):>7}  ({balanced.n_synthetic} synthetic)")

    torch.manual_seed(args.seed)
    idx = range(balanced.n_real, balanced.n_real + min(args.timed, balanced.n_synthetic))
    balanced[idx[0]]                                     # load the generator before timing
    t = time.perf_counter()
    for i in idx:
        balanced[i]
    one = (time.perf_counter() - t) / len(idx)
    model = load_generator(args.generator)
    real = torch.stack([lt[balanced.source_index(i)][0] for i in idx])
    t = time.perf_counter()
    generate(model, real, [balanced.noise_seed(i - balanced.n_real) for i in idx])
    batched = (time.perf_counter() - t) / len(idx)
    print(f"time per synthetic image on {torch.get_num_threads()} CPU thread(s): {one * 1e3:.1f} ms one at a "
          f"time (dataset __getitem__), {batched * 1e3:.1f} ms batched ({len(idx)} per batch)")
    neighbour_figure(model, lt, out / "neighbours.png", seed=args.seed)
    print(f"wrote {out / 'neighbours.png'}: real images (left) and KDE neighbours at alpha {ALPHAS}")
    return 0


def main(argv=None) -> int:
    """``python -m dkgm_aug.demo``: the same as ``dkgm-aug demo`` (a bad argument is one line, exit 2)."""
    from .cli import main as cli_main    # here: cli imports this module
    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
