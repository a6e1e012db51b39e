"""Long-tailed image classification: does DKGM oversampling beat the usual rebalancing tricks?

    python benchmarks/imbalanced.py --data digits --rho 10 --steps 300 --seeds 0 1 2 \
        --out benchmarks/results/imbalanced_digits
    python benchmarks/imbalanced.py --quick --out /tmp/imb      # digits, all methods, 20 steps, 1 seed

The training split is made long-tailed with ``long_tailed_indices`` (CIFAR-10-LT profile,
largest/smallest class = ``--rho``); the test split stays balanced, so top-1 accuracy there
equals balanced accuracy. Every method trains the same timm model from scratch for the same
number of optimizer steps, batch size, optimizer, schedule and base augmentation (random
shift of up to ``--shift`` px by reflect-pad + random crop); only what the method changes differs:

  ce             cross-entropy, batches drawn uniformly from the long-tailed set
  cb_loss        cross-entropy weighted by class-balanced weights (Cui et al. 2019: effective
                 number, beta=0.999), uniform sampling
  ros            random oversampling: items drawn with probability 1/count(class)
  smote          imblearn SMOTE on flattened pixels, k_neighbors=min(5, n_min-1), then uniform
  randaug        torchvision RandAugment on each uint8 image, on top of the base shift
  dkgm_balanced  BalancedDKGMDataset (shipped generator, sampling_strategy="auto"), precomputed once
  dkgm_augment   DKGMAugment(p=0.5) on the minority-class items (all but the largest class) of each batch

Digits are 8x8: they are upsampled (bilinear) to ``--size`` (default 32) inside the loop, after
all augmentation, because a ResNet's stride-32 downsampling would otherwise collapse them.
"""
import argparse
import csv
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dkgm_aug import BalancedDKGMDataset, DKGMAugment
from dkgm_aug.data import digits, fashion_mnist, long_tailed_indices

METHODS = ("ce", "cb_loss", "ros", "smote", "randaug", "dkgm_balanced", "dkgm_augment")
GENERATORS = {"digits": "digits-tiny", "fashion-mnist": "fashion-mnist-tiny"}


# -- metrics ---------------------------------------------------------------------------------------
def tail_classes(train_counts, fraction: float = 1 / 3) -> list:
    """The rarest ``fraction`` of classes by training count (at least one; ties broken by index)."""
    counts = np.asarray(train_counts)
    n_tail = max(1, int(round(len(counts) * fraction)))
    return sorted(np.argsort(counts, kind="stable")[:n_tail].tolist())


def per_class_recall(y_true, y_pred, n_classes: int) -> np.ndarray:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return np.array([(y_pred[y_true == c] == c).mean() if (y_true == c).any() else np.nan
                     for c in range(n_classes)])


def metrics(y_true, y_pred, n_classes: int, tail: list) -> dict:
    from sklearn.metrics import f1_score
    recall = per_class_recall(y_true, y_pred, n_classes)
    return dict(accuracy=float(np.mean(np.asarray(y_true) == np.asarray(y_pred))),
                macro_f1=float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro",
                                        zero_division=0)),
                tail_recall=float(np.nanmean(recall[tail])))


def class_balanced_weights(counts, beta: float = 0.999) -> torch.Tensor:
    """Cui et al.'s (1 - beta) / (1 - beta ** n_c), scaled so the weights sum to the class count."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    w = (1 - beta) / (1 - beta ** n)
    return (w * len(n) / w.sum()).float()


# -- data ------------------------------------------------------------------------------------------
def load(data: str, rho: float, split_seed: int):
    """(long-tailed train set, balanced test set); ``split_seed`` fixes the digits train/test
    split and which images the long-tailed subset keeps."""
    if data == "digits":
        train, test = digits("train", seed=split_seed), digits("test", seed=split_seed)
    else:
        train, test = fashion_mnist(split="train"), fashion_mnist(split="test")
    return train.subset(long_tailed_indices(train.targets, rho, split_seed)), test


def export_split(data: str, rho: float, split_seed: int, path) -> None:
    """Write the long-tailed training split as an ``.npz`` that ``dkgm-aug train --data`` reads,
    so a generator can be trained on exactly what the classifiers see (and nothing more)."""
    lt, _ = load(data, rho, split_seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=lt.images.permute(0, 2, 3, 1).numpy(), labels=lt.targets.numpy())


def random_shift(x: torch.Tensor, shift: int, g: torch.Generator) -> torch.Tensor:
    """Per-image random translation by up to ``shift`` px (reflect-pad, then crop); x is uint8 BCHW."""
    if shift == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x.float(), (shift,) * 4, mode="reflect").to(x.dtype)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, len(x)), generator=g).tolist()
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])


def to_input(x: torch.Tensor, size: int | None) -> torch.Tensor:
    x = x.float() / 255.0
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5


def build_pool(method: str, lt, generator: str, seed: int, log: dict):
    """The images and labels to draw batches from, and per-item sampling weights (None = uniform)."""
    images, targets = lt.images, lt.targets
    counts = torch.bincount(targets, minlength=10)
    if method == "ros":
        return images, targets, 1.0 / counts[targets].double()
    if method == "smote":
        from imblearn.over_sampling import SMOTE
        # SMOTE needs 2+ items per class; at rho=100 on digits the rarest class has one, so
        # singletons are duplicated first (SMOTE then just copies them, like ros would).
        X, y = images.flatten(1).numpy().astype(np.float32), targets.numpy()
        single = np.flatnonzero(np.isin(y, np.flatnonzero(counts.numpy() == 1)))
        X, y = np.concatenate([X, X[single]]), np.concatenate([y, y[single]])
        k = min(5, int(np.bincount(y)[np.bincount(y) > 0].min()) - 1)
        X, y = SMOTE(k_neighbors=k, random_state=seed).fit_resample(X, y)
        X = np.clip(np.round(X), 0, 255).astype(np.uint8).reshape(-1, *images.shape[1:])
        return torch.from_numpy(X), torch.from_numpy(y.astype(np.int64)), None
    if method == "dkgm_balanced":
        start = time.perf_counter()
        ds = BalancedDKGMDataset(lt, generator=generator, sampling_strategy="auto", seed=seed,
                                 cache="memory", progress=False).precompute(batch_size=256, progress=False)
        log["precompute_s"] = time.perf_counter() - start
        # Synthetic items come back as float [0, 1] tensors quantized to 256 levels: exact in uint8.
        synth = torch.stack([(ds[i][0] * 255).round().to(torch.uint8) for i in range(ds.n_real, len(ds))])
        labels = torch.as_tensor([int(t) for t in ds.targets[ds.n_real:]])
        return torch.cat([images, synth]), torch.cat([targets, labels]), None
    return images, targets, None


# -- one run ---------------------------------------------------------------------------------------
def run(method: str, args, seed: int) -> dict:
    import timm
    from torchvision.transforms import v2
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    lt, test = load(args.data, args.rho, seed)
    counts = torch.bincount(lt.targets, minlength=10)
    generator = GENERATORS[args.data]
    log = {"precompute_s": 0.0}
    images, targets, weights = build_pool(method, lt, generator, seed, log)
    size = args.size if args.data == "digits" else None

    model = timm.create_model(args.model, num_classes=10, in_chans=1, pretrained=False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    loss_w = class_balanced_weights(counts) if method == "cb_loss" else None
    randaug = v2.RandAugment() if method == "randaug" else None
    dkgm = DKGMAugment(generator, p=0.5, seed=seed) if method == "dkgm_augment" else None
    minority = counts < counts.max()   # "minority" = every class but the largest

    start = time.perf_counter()
    model.train()
    for _ in range(args.steps):
        idx = (torch.multinomial(weights, args.batch, replacement=True, generator=g) if weights is not None
               else torch.randint(len(images), (args.batch,), generator=g))
        x, y = random_shift(images[idx], args.shift, g), targets[idx]
        if randaug is not None:   # per image, so each gets its own ops (a batch call shares them)
            x = torch.stack([randaug(im) for im in x])
        if dkgm is not None and minority[y].any():
            m = minority[y]
            x[m] = dkgm(x[m])     # uint8 in, uint8 out; each item replaced with probability 0.5
        loss = F.cross_entropy(model(to_input(x, size)), y, weight=loss_w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(to_input(test.images[i:i + 512], size)).argmax(1)
                          for i in range(0, len(test), 512)])
    res = metrics(test.targets.numpy(), pred.numpy(), 10, tail_classes(counts.tolist()))
    return dict(method=method, seed=seed, n_train=len(lt), n_pool=len(images), final_loss=round(loss.item(), 4),
                train_s=round(train_s, 2), precompute_s=round(log["precompute_s"], 2), **res)


# -- reporting -------------------------------------------------------------------------------------
def summarise(rows: list) -> dict:
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        out[m] = {k: (float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs])))
                  for k in ("accuracy", "macro_f1", "tail_recall", "train_s", "precompute_s")}
        out[m]["n"] = len(rs)
    return out


def hardware() -> str:
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return f"{cpu}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__}, CPU only"


def write_outputs(rows: list, args, argv: list, wall_s: float, tail: list) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    s = summarise(rows)
    lines = ["# Long-tailed classification benchmark", "",
             f"Command: `python benchmarks/imbalanced.py {' '.join(argv)}`", "",
             f"- data: {args.data} (train long-tailed with rho={args.rho}; test balanced, so accuracy = "
             f"balanced accuracy); tail classes (rarest third): {tail}",
             f"- model: timm `{args.model}` from scratch, in_chans=1"
             + (f", 8x8 inputs upsampled to {args.size}x{args.size}" if args.data == "digits" else ""),
             f"- {args.steps} Adam steps (lr {args.lr}, cosine), batch {args.batch}, base aug: random shift "
             f"<= {args.shift} px; seeds {args.seeds}",
             f"- threads: {torch.get_num_threads()}; hardware: {hardware()}",
             f"- wall time: {wall_s:.0f} s", "",
             "| method | accuracy | macro-F1 | tail recall | train s | DKGM precompute s | runs |",
             "|---|---|---|---|---|---|---|"]
    for m, v in s.items():
        f = lambda k, d=3: f"{v[k][0]:.{d}f} ± {v[k][1]:.{d}f}"
        lines.append(f"| {m} | {f('accuracy')} | {f('macro_f1')} | {f('tail_recall')} | {v['train_s'][0]:.1f} "
                     f"| {v['precompute_s'][0]:.2f} | {v['n']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, xs = list(s), np.arange(len(s))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    for off, key, label in ((-0.2, "accuracy", "accuracy"), (0.2, "tail_recall", "tail recall")):
        ax.bar(xs + off, [s[m][key][0] for m in names], 0.4, yerr=[s[m][key][1] for m in names],
               capsize=3, label=label)
    ax.set_xticks(xs, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(f"{args.data}, rho={args.rho}, {args.model}, {args.steps} steps, {len(args.seeds)} seed(s)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=sorted(GENERATORS), default="digits")
    p.add_argument("--rho", type=float, default=100)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--shift", type=int, default=1, help="base augmentation: max random shift in px")
    p.add_argument("--size", type=int, default=32, help="digits are upsampled to this size")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="digits, rho 10, 20 steps, batch 32, seed 0 (smoke test)")
    p.add_argument("--out", default="benchmarks/results/imbalanced")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.rho, args.steps, args.batch, args.seeds = "digits", 10, 20, 32, [0]
    torch.set_num_threads(args.threads)

    start, rows = time.perf_counter(), []
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    for m, s in (bar := tqdm(jobs, desc="runs")):
        bar.set_postfix(method=m, seed=s)
        rows.append(run(m, args, s))
        tqdm.write(f"{m:>14} seed {s}: acc {rows[-1]['accuracy']:.3f}  tail recall {rows[-1]['tail_recall']:.3f}  "
                   f"({rows[-1]['train_s']:.1f} s)")
    lt, _ = load(args.data, args.rho, args.seeds[0])
    tail = tail_classes(torch.bincount(lt.targets, minlength=10).tolist())
    write_outputs(rows, args, argv, time.perf_counter() - start, tail)
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
