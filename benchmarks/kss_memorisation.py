"""Memorisation of the kernel-smoothed empirical score vs its bandwidth h (paper 002).

Per class, a :class:`dkgm_aug.kss.KernelSmoothedScore` holding ``--n-ref`` training images of
that class (a seeded random subset) generates ``--n-samples`` images

* ``sample``: from noise, the reverse SDE from ``T = sigma_max**2``;
* ``neighbour``: SDEdit-style neighbours of training images of the class (alpha ``--alpha``),
  the mode used for oversampling,

for every ``h`` of ``--hs`` (``[-1, 1]`` pixel units). Reported per (mode, h), averaged over
classes: memorisation share (nearest training image closer than 1/3 of the second nearest),
mean nearest-neighbour distance (novelty, Euclidean in ``[-1, 1]`` units; for reference the
mean distance of a training image to its nearest *other* training image is printed), diversity
(mean pairwise distance between samples of a class divided by that of the training images of
the class), and for neighbours the share whose nearest training image is its own source.

Usage:  python benchmarks/kss_memorisation.py [--quick] [--dataset fashion-mnist|digits] ...
Writes ``--out``.csv, .md and .png (default benchmarks/results/kss_memorisation).
"""
import argparse
import csv
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dkgm_aug.data import digits, fashion_mnist  # noqa: E402
from dkgm_aug.errors import DataError  # noqa: E402
from dkgm_aug.kss import KernelSmoothedScore, memorisation, nearest_neighbour_distances  # noqa: E402
from common import RESULTS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = RESULTS / "kss_memorisation"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["auto", "fashion-mnist", "digits"], default="auto",
                   help="auto: Fashion-MNIST when installed, else scikit-learn digits")
    p.add_argument("--classes", type=int, nargs="*", default=None, help="class indices (default: all)")
    p.add_argument("--n-ref", type=int, default=2000, help="training images per class held by the model")
    p.add_argument("--n-samples", type=int, default=16, help="generated images per class, mode and h")
    p.add_argument("--hs", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    p.add_argument("--steps", type=int, default=100, help="reverse steps from noise")
    p.add_argument("--neighbour-steps", type=int, default=50, help="reverse steps of the neighbour mode")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--n-smooth", type=int, default=8)
    p.add_argument("--t-min", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="digits, 2 classes, tiny settings (< 60 s)")
    p.add_argument("--out", default=str(OUT), help="output path without extension")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.classes, args.n_ref, args.n_samples = "digits", [0, 1], 60, 8
        args.hs, args.steps, args.neighbour_steps, args.n_smooth = [0.0, 1.0], 30, 15, 4
    return args


def load(name):
    if name in ("auto", "fashion-mnist"):
        try:
            return "fashion-mnist", fashion_mnist(split="train")
        except DataError:
            if name == "fashion-mnist":
                raise
    return "digits", digits(split="train")


def mean_pairwise(x):
    x = x.reshape(len(x), -1).double()
    d = torch.cdist(x, x)
    return float(d.sum() / (len(x) * (len(x) - 1)))


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    name, ds = load(args.dataset)
    classes = args.classes if args.classes is not None else list(range(len(ds.classes)))
    g = torch.Generator().manual_seed(args.seed)
    rows, grids = [], {}
    ref_stats = []
    for c in classes:
        members = torch.nonzero(ds.targets == c).flatten()
        members = members[torch.randperm(len(members), generator=g)[:args.n_ref]]
        train = ds.images[members]
        model = KernelSmoothedScore(train, steps=args.steps, n_smooth=args.n_smooth, t_min=args.t_min,
                                    alpha=args.alpha)
        own, _ = nearest_neighbour_distances(train, train, 2)
        train_nn, train_div = float(own[:, 1].mean()), mean_pairwise(train[:200].float() / 127.5 - 1)
        ref_stats.append((train_nn, train_div))
        src_idx = torch.randperm(len(train), generator=g)[:args.n_samples]
        sources = train[src_idx].float() / 127.5 - 1
        seeds = [args.seed * 1_000_003 + 1000 * c + i for i in range(args.n_samples)]
        for h in args.hs:
            for mode in ("sample", "neighbour"):
                t0 = time.time()
                if mode == "sample":
                    out = model.sample(args.n_samples, seeds=seeds, h=h)
                else:
                    out = model.neighbours_from_seeds(sources, seeds, h=h, steps=args.neighbour_steps)
                secs = time.time() - t0
                d, idx = nearest_neighbour_distances(out, train, 2)
                row = dict(dataset=name, cls=c, mode=mode, h=h, memorisation=memorisation(out, train),
                           nn_distance=float(d[:, 0].mean()), second_nn_distance=float(d[:, 1].mean()),
                           diversity=mean_pairwise(out) / train_div, train_nn_distance=train_nn,
                           own_source=float((idx[:, 0] == src_idx).double().mean()) if mode == "neighbour" else "",
                           seconds=secs)
                rows.append(row)
                if c == classes[0]:
                    grids[(mode, h)] = out[:8]
                print(f"class {c} {mode:9s} h={h:<5g} memorisation {row['memorisation']:.2f}  "
                      f"NN {row['nn_distance']:.2f}  diversity {row['diversity']:.2f}  {secs:.1f}s", flush=True)
    wall = time.time() - start
    write(args, argv, name, ds, classes, rows, grids, ref_stats, wall)
    return rows


def summarise(rows, hs):
    out = []
    for mode in ("sample", "neighbour"):
        for h in hs:
            sel = [r for r in rows if r["mode"] == mode and r["h"] == h]
            mean = lambda k: sum(r[k] for r in sel) / len(sel)  # noqa: E731
            out.append(dict(mode=mode, h=h, memorisation=mean("memorisation"), nn_distance=mean("nn_distance"),
                            diversity=mean("diversity"),
                            own_source=mean("own_source") if mode == "neighbour" else None,
                            seconds=sum(r["seconds"] for r in sel)))
    return out


def write(args, argv, name, ds, classes, rows, grids, ref_stats, wall):
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = summarise(rows, args.hs)
    cmd = "python benchmarks/kss_memorisation.py" + ("" if not argv else " " + shlex.join(argv))
    if argv is None:
        cmd = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    train_nn = sum(s[0] for s in ref_stats) / len(ref_stats)
    n_cls, hw = len(classes), "x".join(str(v) for v in ds.images.shape[2:])
    lines = [
        "# Kernel-smoothed empirical score: memorisation vs bandwidth h", "",
        f"Command: `{cmd}`", "",
        f"Data: {name} train ({hw}), classes {classes}; per class a model holding {args.n_ref} training "
        f"images of that class (seeded random subset, seed {args.seed}); {args.n_samples} generated images "
        f"per class, mode and h ({args.n_samples * n_cls} per row of the table).", "",
        f"Settings: from noise `steps={args.steps}` on a geometric grid from `T = sigma_max^2` "
        f"(sigma_max = 2 x max distance to the class mean) to `t_min={args.t_min}`; neighbours: "
        f"`alpha={args.alpha}` (`t0 = alpha^2`), `steps={args.neighbour_steps}`, sources = training images "
        f"held by the model; `n_smooth={args.n_smooth}` kernel draws per image and step. h in [-1, 1] "
        f"pixel units.", "",
        f"Machine: {platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}; "
        f"wall time {wall:.0f} s.", "",
        "Memorisation: share of generated images whose nearest training image is closer than 1/3 of the "
        "distance to the second nearest. NN distance: mean Euclidean distance to the nearest training "
        f"image in [-1, 1] units (a training image's nearest *other* training image is {train_nn:.2f} away "
        "on average). Diversity: mean pairwise distance between generated images of a class / the same "
        "for its training images. Own source: share of neighbours whose nearest training image is the "
        "image they were made from. Averages over classes.", "",
        "| mode | h | memorisation | NN distance | diversity | own source | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        own = "" if s["own_source"] is None else f"{s['own_source']:.2f}"
        lines.append(f"| {s['mode']} | {s['h']:g} | {s['memorisation']:.2f} | {s['nn_distance']:.2f} | "
                     f"{s['diversity']:.2f} | {own} | {s['seconds']:.1f} |")
    lines += ["", f"Samples of class {classes[0]}: `{out.with_suffix('.png').name}` (rows: mode and h, "
              "first 8 images)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    keys = list(grids)
    fig, axes = plt.subplots(len(keys), 8, figsize=(8 * 0.9, len(keys) * 0.95), squeeze=False)
    for r, key in enumerate(keys):
        imgs = grids[key]
        for j in range(8):
            ax = axes[r, j]
            ax.axis("off")
            if j < len(imgs):
                ax.imshow(((imgs[j] + 1) / 2).permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r, 0].text(-0.5, 0.5, f"{key[0]}\nh={key[1]:g}", transform=axes[r, 0].transAxes, ha="right",
                        va="center", fontsize=7)
    fig.subplots_adjust(left=0.14, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(out.with_suffix(".png"), dpi=100)
    plt.close(fig)
    print(f"wrote {out}.csv/.md/.png in {wall:.0f} s")


if __name__ == "__main__":
    main()
