"""Quality of the shipped generators vs alpha, and a stage-2 bandwidth sweep (paper's Table 2).

    OMP_NUM_THREADS=1 python benchmarks/generator_quality.py --out benchmarks/results/generator_quality
    python benchmarks/generator_quality.py --quick --out /tmp/gq      # digits-tiny only, < 60 s

Every shipped generator makes one neighbour of each of ``n`` images drawn (seeded) from the
training set it was trained on (read from its checkpoint metadata), as augmentation does,
for alpha 0.25 / 0.5 / 1.0. Reported:

* sharpness (the paper's Laplacian variance, images in [0, 1]) of the sources, of stage 1
  (the KDE neighbour ``f_theta(x + alpha eps)``, clamped) and of stage 1+2 (Algorithm 2);
* Frechet distance to ``n`` real test images in the penultimate-layer features of the
  dataset's yardstick (``common.yardstick``: the shipped evaluator, ``dkgm_aug.list_evaluators()``,
  made by ``benchmarks/train_evaluator.py`` on 90% of the training split, where there is one).
  Not Inception features: not FID, and not comparable with FID numbers;
* label preservation: share of neighbours that classifier assigns to their source's class;
* memorisation (``dkgm_aug.kss.memorisation``: the nearest training image is closer than
  1/3 of the distance to the second nearest) and novelty (mean Euclidean distance to the
  nearest training image, [-1, 1] pixel units), of the final output only.

Calibration rows use real images: the sources themselves (exact copies: memorisation 1,
distance 0) and ``n`` further test images, disjoint from the reference (new real images).

The EVAE has one stage and its alpha scales the *latent* noise (1 = its own posterior,
0 = the posterior-mean reconstruction), not pixel noise as DKGM's alpha; its rows say so.

Bandwidth sweep: ``digits-tiny`` keeps its stage 1; a stage 2 is trained from scratch
(same initial weights every time) for ``--sweep-steps`` steps at batch 32 per blur setting,
b fixed or b ~ U[b_min, b_max] (the blur's standard deviation in pixels, docs/design.md,
section 1), and debiases the same stage-1 outputs (alpha 0.5).
"""
import argparse
import csv
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
import dkgm_aug  # noqa: E402
from dkgm_aug import DKGM, Trainer  # noqa: E402
from dkgm_aug.data import load_dataset  # noqa: E402
from dkgm_aug.features import accuracy, features  # noqa: E402
from dkgm_aug.images import from_model, to_model  # noqa: E402
from dkgm_aug.kss import memorisation, nearest_neighbour_distances  # noqa: E402
from dkgm_aug.metrics import frechet_distance, sharpness  # noqa: E402
from common import RESULTS, cpu_name, yardstick  # noqa: E402

ALPHAS = (0.25, 0.5, 1.0)
SWEEP_GENERATOR = "digits-tiny"
SWEEP = ((0.5, 0.5), (1.0, 1.0), (0.25, 1.0), (0.5, 1.0), (0.5, 1.5))   # (b_min, b_max) in pixels
SWEEP_BATCH = 32
BATCH = 250
FIELDS = ["section", "generator", "data", "alpha", "stage", "n", "sharpness", "frechet_distance",
          "label_preservation", "memorisation", "nn_distance", "seconds"]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generators", nargs="+", default=None, help="default: all of dkgm_aug.list_pretrained()")
    p.add_argument("--n", type=int, default=500, help="sources per setting (capped at half the test set)")
    p.add_argument("--sweep-steps", type=int, default=150, help="stage-2 training steps per blur setting")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS),
                   help="noise levels of the generator rows (e.g. add a checkpoint's calibrated alpha)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "generator_quality"), help="output directory")
    p.add_argument("--quick", action="store_true", help="digits-tiny, alpha 0.5, n 64, 2 x 10 sweep steps")
    args = p.parse_args(argv)
    args.sweep = SWEEP
    if args.quick:
        args.generators, args.alphas, args.n = [SWEEP_GENERATOR], (0.5,), 64
        args.sweep, args.sweep_steps = ((0.5, 0.5), (0.5, 1.0)), 10
    args.generators = args.generators or dkgm_aug.list_pretrained()
    return args


def data_of(model) -> str:
    """The dataset a shipped generator was trained on, from its checkpoint metadata."""
    text = str(model.info.get("training", {}).get("data", ""))
    for key, name in (("digits", "digits"), ("Fashion-MNIST", "fashion-mnist")):
        if key in text:
            return name
    raise ValueError(f"no dataset known for training data {text!r}")


@torch.inference_mode()
def scores(net, x, labels, ref_feats):
    """(sharpness, Frechet distance to ``ref_feats``, share classified as ``labels``) of ``x`` in [-1, 1]."""
    f = features(net, from_model(x))
    hits = (net.head(f).argmax(1) == labels).double().mean()
    return sharpness(from_model(x)), frechet_distance(f, ref_feats), float(hits)


def novelty(x, train_images):
    """(memorisation share, mean distance to the nearest training image) of ``x`` in [-1, 1];
    uint8 ``train_images`` are read as [-1, 1] too."""
    d, _ = nearest_neighbour_distances(x, train_images, 1)
    return memorisation(x, train_images), float(d[:, 0].mean())


def record(section, generator, data, alpha, stage, x, labels, d, final, seconds=None) -> dict:
    """One CSV row: the scores of ``x`` made from sources with ``labels``; novelty only for ``final`` outputs."""
    sharp, fd, kept = scores(d.net, x, labels, d.ref_feats)
    mem, nn = novelty(x, d.train.images) if final else (None, None)
    return dict(section=section, generator=generator, data=data, alpha=alpha, stage=stage, n=len(x),
                sharpness=sharp, frechet_distance=fd, label_preservation=kept, memorisation=mem,
                nn_distance=nn, seconds=seconds)


def prepare(data: str, n: int, seed: int):
    """Sources (training images), a reference and a held-out real set (disjoint test draws),
    the classifier, and the calibration records of the real images."""
    train, test = load_dataset(data, split="train"), load_dataset(data, split="test")
    n = min(n, len(test) // 2)
    g = torch.Generator().manual_seed(seed)
    src, tst = torch.randperm(len(train), generator=g)[:n], torch.randperm(len(test), generator=g)[:2 * n]
    net, net_note = yardstick(data)
    d = SimpleNamespace(data=data, train=train, n=n, net=net, net_note=net_note, test_accuracy=accuracy(net, test),
                        n_test=len(test), sources=to_model(train.images[src].float() / 255), labels=train.targets[src])
    d.ref_feats = features(net, test.images[tst[:n]])
    held = to_model(test.images[tst[n:]].float() / 255)
    d.real = []
    for name, x, labels in (("training sources (copies)", d.sources, d.labels),
                            ("held-out test images", held, test.targets[tst[n:]])):
        d.real.append(record("real", name, data, None, "real", x, labels, d, final=True))
    d.sharp_sources = d.real[0]["sharpness"]
    return d


@torch.inference_mode()
def neighbours(model, x, alpha, seed):
    """(stage 1, stage 1+2) neighbours of ``x``, one per image; one-stage generators give (output, None)."""
    if not isinstance(model, DKGM):
        seeds = [seed * 1_000_003 + i for i in range(len(x))]
        return torch.cat([model.neighbours_from_seeds(x[i:i + BATCH], seeds[i:i + BATCH], alpha=alpha)
                          for i in range(0, len(x), BATCH)]), None
    g = torch.Generator().manual_seed(seed)
    s1, s12 = [], []
    for i in range(0, len(x), BATCH):
        a, b = model.sample(x[i:i + BATCH], alpha=alpha, generator=g, return_stages=True)
        s1.append(a)
        s12.append(b)
    return torch.cat(s1), torch.cat(s12)


def b_label(lo, hi) -> str:
    return f"b = {lo:g}" if lo == hi else f"b ~ U[{lo:g}, {hi:g}]"


def sweep(base: DKGM, d, args) -> list:
    """Stage 2 trained from scratch per blur setting, applied to the shipped stage 1's outputs."""
    with torch.inference_mode():
        kde = base.kde(d.sources, alpha=0.5, generator=torch.Generator().manual_seed(args.seed + 1))
        shipped = base.debias(kde).clamp(-1, 1)
    t = base.info.get("training", {})
    batch = t.get("batch_size", "?")
    batch = batch.get("2", "?") if isinstance(batch, dict) else batch
    runs = [("stage 1 only", None, kde.clamp(-1, 1)),
            (f"shipped: {b_label(*base.b_range)}, {t.get('stage2_steps', '?')} steps x {batch}", None, shipped)]
    for lo, hi in args.sweep:
        torch.manual_seed(args.seed)                      # the same initial stage-2 weights for every setting
        model = DKGM.from_config(dict(base.config(), b_range=[lo, hi]))
        start = time.time()
        with tempfile.TemporaryDirectory() as work:
            Trainer(model, d.train.images, out_dir=work, batch_size=SWEEP_BATCH, max_steps=args.sweep_steps,
                    seed=args.seed, save_every=10 ** 9, resume=False).fit(2)
        with torch.inference_mode():
            out = model.debias(kde).clamp(-1, 1)
        runs.append((f"{b_label(lo, hi)}, {args.sweep_steps} steps x {SWEEP_BATCH}", time.time() - start, out))
    return [record("bandwidth", name, d.data, 0.5, "stage 1+2" if i else "stage 1", x, d.labels, d,
                   final=False, seconds=secs) for i, (name, secs, x) in enumerate(runs)]


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    datasets, records = {}, []
    for name in args.generators:
        model = dkgm_aug.load(name).eval()
        data = data_of(model)
        if data not in datasets:
            datasets[data] = prepare(data, args.n, args.seed)
            records += datasets[data].real
        d = datasets[data]
        for alpha in tqdm(args.alphas, desc=name):
            t0 = time.time()
            s1, s12 = neighbours(model, d.sources, alpha, args.seed + 1)
            secs = time.time() - t0
            records.append(record("generator", name, data, alpha, "stage 1", s1, d.labels, d, s12 is None, secs))
            if s12 is not None:
                records.append(record("generator", name, data, alpha, "stage 1+2", s12, d.labels, d, True, secs))
    if SWEEP_GENERATOR in args.generators:
        base = dkgm_aug.load(SWEEP_GENERATOR).eval()
        records += sweep(base, datasets[data_of(base)], args)
    write(args, argv, datasets, records, time.time() - start)
    return records


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def write(args, argv, datasets, records, wall):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(records)
    if argv is None:
        cmd = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    else:
        cmd = "python benchmarks/generator_quality.py" + ("" if not argv else " " + shlex.join(argv))
    lines = ["# Shipped generators: sharpness, Frechet distance, label preservation, memorisation", "",
             f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} {cmd}`", "",
             f"Seeds: `--seed {args.seed}` draws the sources, the reference and the held-out images; "
             f"neighbour noise uses seed {args.seed + 1}; the sweep's stage-2 initialisation and batch order use "
             f"seed {args.seed}. n = {args.n} requested per setting (capped at half the test set).", "",
             f"Machine: {cpu_name()} CPU, torch {torch.__version__}, {args.threads} torch thread(s); wall time {wall:.0f} s.", ""]
    for d in datasets.values():
        info = d.net.info.get("evaluator")
        made = f" (`{info['command']}`, {info['n_fit']} training images)" if info else ""
        lines.append(f"Yardstick for {d.data}: {d.net_note}{made}; test accuracy {d.test_accuracy:.4f} on {d.n_test} "
                     f"test images. n = {d.n}.")
    lines += ["", "Frechet distance: to n real test images (the reference), in the 128-d penultimate features of "
              "that classifier (not FID). Label preservation: share of outputs the classifier assigns to their "
              "source's class. Both come from that classifier, the one yardstick of every generator table. "
              "Memorisation: share of final outputs whose nearest training image is closer than "
              "1/3 of the distance to the second nearest; NN distance: mean Euclidean distance to the nearest "
              "training image ([-1, 1] units). S1 = stage 1 (KDE), S1+2 = stage 1 + stage 2 (Algorithm 2).", "",
              "## Real images (calibration)", "",
              "| data | real images | n | sharpness | Frechet distance | label preservation (= classifier "
              "accuracy) | memorisation | NN distance |", "|---|---|---|---|---|---|---|---|"]
    for d in datasets.values():
        for r in d.real:
            lines.append(f"| {d.data} | {r['generator']} | {r['n']} | {fmt(r['sharpness'], '.4f')} | "
                         f"{fmt(r['frechet_distance'])} | {fmt(r['label_preservation'])} | "
                         f"{fmt(r['memorisation'])} | {fmt(r['nn_distance'])} |")
    lines += ["", "## Generators vs alpha", "",
              "| generator | data | alpha | sharpness real | sharpness S1 | sharpness S1+2 | Frechet S1 | "
              "Frechet S1+2 | label pres. S1 | label pres. S1+2 | memorisation | NN distance |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    gen = [r for r in records if r["section"] == "generator"]
    for key in dict.fromkeys((r["generator"], r["alpha"]) for r in gen):
        by = {r["stage"]: r for r in gen if (r["generator"], r["alpha"]) == key}
        s1, s12 = by["stage 1"], by.get("stage 1+2", {})
        final = s12 or s1
        alpha = f"{key[1]:g}" + ("" if s12 else " (latent noise scale; one stage)")
        lines.append(f"| {key[0]} | {s1['data']} | {alpha} | {datasets[s1['data']].sharp_sources:.4f} | "
                     f"{s1['sharpness']:.4f} | {fmt(s12.get('sharpness'), '.4f')} | {s1['frechet_distance']:.3f} | "
                     f"{fmt(s12.get('frechet_distance'))} | {s1['label_preservation']:.3f} | "
                     f"{fmt(s12.get('label_preservation'))} | {final['memorisation']:.3f} | "
                     f"{final['nn_distance']:.3f} |")
    bw = [r for r in records if r["section"] == "bandwidth"]
    if bw:
        lines += ["", f"## Stage-2 bandwidth sweep ({SWEEP_GENERATOR}, alpha 0.5, n = {bw[0]['n']})", "",
                  f"Shipped stage 1 kept; each stage 2 trained from the same initial weights on the "
                  f"{bw[0]['data']} training set (Trainer defaults: Adam 3e-4, EMA), then run on the same stage-1 "
                  "outputs. b is the blur's standard deviation in pixels. A small budget: compare the rows with "
                  "each other, not with the shipped stage 2.", "",
                  "| stage 2 | sharpness | Frechet distance | label preservation | training s |",
                  "|---|---|---|---|---|"]
        for r in bw:
            lines.append(f"| {r['generator']} | {r['sharpness']:.4f} | {r['frechet_distance']:.3f} | "
                         f"{r['label_preservation']:.3f} | {fmt(r['seconds'], '.0f')} |")
    lines += ["", "Files: `results.csv` (all numbers), `results.png` (Frechet distance and label preservation "
              "vs alpha)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(gen, datasets, out / "results.png")
    print(f"wrote {out}/results.md, .csv, .png in {wall:.0f} s")


def plot(gen, datasets, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, name in enumerate(dict.fromkeys(r["generator"] for r in gen)):
        one_stage = not any(r["generator"] == name and r["stage"] == "stage 1+2" for r in gen)
        for stage, style in (("stage 1", ":" if one_stage else "--"), ("stage 1+2", "-")):
            rows = [r for r in gen if r["generator"] == name and r["stage"] == stage]
            if not rows:
                continue
            label = f"{name} (latent alpha)" if one_stage else f"{name} {stage}"
            for ax, key in zip(axes, ("frechet_distance", "label_preservation")):
                ax.plot([r["alpha"] for r in rows], [r[key] for r in rows], style, color=f"C{i}", marker="o",
                        label=label)
    for j, d in enumerate(datasets.values()):
        for real, color in zip(d.real, ("black", "gray")):
            for ax, key in zip(axes, ("frechet_distance", "label_preservation")):
                ax.axhline(real[key], color=color, linestyle=(0, (1, 2 + 2 * j)),
                           label=f"real {d.data}: {real['generator']}")
    axes[0].set(xlabel="alpha", ylabel="Frechet distance to real test images", yscale="log",
                title="Frechet distance (our classifier's features)")
    axes[1].set(xlabel="alpha", ylabel="share classified as the source's class", ylim=(0, 1.02),
                title="label preservation")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
