"""Long-tailed image classification: does DKGM oversampling beat the usual rebalancing tricks?

    python benchmarks/imbalanced.py --data digits --rho 10 --steps 300 --seeds 0 1 2 \
        --out benchmarks/results/imbalanced_digits
    python benchmarks/imbalanced.py --quick --out /tmp/imb      # digits, all methods, 20 steps, 1 seed
    python benchmarks/imbalanced.py --data fashion-mnist --rho 100 --export-split runs/lt/split.npz
        # the long-tailed training split as .npz, to train a generator on exactly what the classifiers see

The training split is made long-tailed with ``long_tailed_indices`` (CIFAR-10-LT profile,
largest/smallest class = ``--rho``); the test split stays balanced, so top-1 accuracy there
equals balanced accuracy. Every method trains the same timm model from scratch for the same
number of optimizer steps, batch size, optimizer, schedule and base augmentation (random
shift of up to ``--shift`` px by reflect-pad + random crop); only what the method changes differs:

  ce             cross-entropy, batches drawn uniformly from the long-tailed set
  cb_loss        cross-entropy weighted by class-balanced weights (Cui et al. 2019: effective
                 number, beta=0.999), uniform sampling
  drw            deferred re-weighting (Cao et al. 2019): ce, then class-balanced weights from
                 --drw-start (a fraction of the run) on
  ldam_drw       LDAM loss (margins C / n_c^(1/4), largest --ldam-margin, logits scaled by
                 --ldam-s) with drw's deferred weights
  balanced_softmax  logit adjustment / Balanced Softmax (Menon et al. 2021, Ren et al. 2020):
                 cross-entropy on logits + --la-tau * log(class prior); plain logits at test
  mixup          mixup (Zhang et al. 2018, --mixup-alpha) of images and labels, uniform sampling
  mixup_drw      mixup with drw's deferred weights
  ros            random oversampling: items drawn with probability 1/count(class)
  smote          imblearn SMOTE on flattened pixels, k_neighbors=min(5, n_min-1), then uniform
  randaug        torchvision RandAugment on each uint8 image, on top of the base shift
  dkgm_balanced  BalancedDKGMDataset(generator=--generator, sampling_strategy="auto"), batches drawn uniformly
  dkgm_augment   DKGMAugment(--generator, p=--dkgm-p) on the minority-class items (all but the largest class) of each batch
  ros_dkgm       ros, then dkgm_augment's transform: copies and neighbours mixed, half of each
  loss_dkgm      the loss-side method --combine-loss, plus dkgm_augment's transform
  dkgm_deferred  ce on the long-tailed set, then from --drw-start on batches drawn from
                 dkgm_balanced's set: neighbours enter only in the last phase, as drw's weights do
  evae_balanced  the same wrapper around an EVAE: --evae, or one fitted here on the long-tailed split
  kss_balanced   the same wrapper around the kernel-smoothed-score sampler built from the long-tailed split

Converged protocol (``--epochs E``): every method trains for E passes over its training split
(``ceil(n / batch)`` steps each). ``--val-fraction`` of each class of the long-tailed training
split (at least one image) is held out as a validation split, long-tailed like it; after
every epoch the validation balanced accuracy (mean per-class recall) and the epoch's mean
training loss go to ``curves.csv``. The weights of the best validation epoch are kept, and
the test split is read once per run, with them. Knob variants of a method (``--dkgm-p``,
``--la-tau``, ...) are rows with other ``knobs``; the report keeps, per method, the variant
with the best mean validation balanced accuracy, so no knob is chosen by looking at test
results. Without ``--epochs``, the older fixed-``--steps`` protocol runs (no validation).
``--class-order`` (natural, reversed, perm:<seed>) and ``--profile`` (exp, step) shape the split.

The long-tailed split is fixed by ``--split-seed``; ``--seeds`` vary everything else (weights,
batches, augmentation and generator noise). The balanced wrappers generate a synthetic item the
first time a batch draws it (``BalancedDKGMDataset.__getitems__``, one generator call per batch)
and keep it: with per-item noise seeds this gives the same images as ``precompute()`` and
uniform sampling, but only the items the run draws are made. ``--generator`` defaults to the
shipped model for ``--data``, which was trained on the *full* training split and so has seen
tail-class images the classifiers have not; the report prints each generator's training data.
``--bank K`` makes the augmented rows (dkgm_augment, ros_dkgm, loss_dkgm) draw each neighbour from
a ``NeighbourBank`` of K neighbours per minority-class training image instead of generating it:
made once (bank seed 0, so every classifier seed sees the same neighbours, and with the label
filter when one is set) into ``<out>/banks/``, resumable shard by shard and reopened by its
fingerprint, so the generator's cost is paid once per generator and split, not per row. The
neighbour then replaces the image *before* the base shift (the bank knows images by their
pixels), where online generation works on the shifted image. ``bank=K`` is a knob of those rows.
Rows are appended to ``runs.csv`` as each run ends (``--resume`` skips the done ones), and the
report is rebuilt from every row of that file with the same settings.

Digits are 8x8: they are upsampled (bilinear) to ``--size`` (default 32) inside the loop, after
all augmentation, because a ResNet's stride-32 downsampling would otherwise collapse them.
"""
import argparse
import csv
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dkgm_aug import BalancedDKGMDataset, BankAugment, DKGMAugment, LabelFilter
from dkgm_aug.nn import evaluating
from dkgm_aug.data import PROFILES, stratified_holdout
from common import SHIPPED, cpu_name, long_tailed_split, tail_classes

METHODS = ("ce", "cb_loss", "drw", "ldam_drw", "balanced_softmax", "mixup", "mixup_drw", "ros", "smote", "randaug",
           "dkgm_balanced", "dkgm_augment", "ros_dkgm", "loss_dkgm", "dkgm_deferred", "evae_balanced", "kss_balanced")
BALANCED = ("dkgm_balanced", "evae_balanced", "kss_balanced")
AUGMENTED = ("dkgm_augment", "ros_dkgm", "loss_dkgm")   # DKGMAugment(p=--dkgm-p) on each batch's minority items
LOSSES = ("ce", "cb_loss", "drw", "ldam_drw", "balanced_softmax", "mixup", "mixup_drw")
GENERATIVE = BALANCED + AUGMENTED + ("dkgm_deferred",)


# -- metrics ---------------------------------------------------------------------------------------
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
                tail_recall=float(np.nanmean(recall[tail])),
                class_recall=";".join(f"{r:.4f}" for r in recall))


def class_balanced_weights(counts, beta: float = 0.999) -> torch.Tensor:
    """Cui et al.'s (1 - beta) / (1 - beta ** n_c), scaled so the weights sum to the class count."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    w = (1 - beta) / (1 - beta ** n)
    return (w * len(n) / w.sum()).float()


def drw_weights(counts, progress: float, start: float):
    """Deferred re-weighting: no weights before ``start`` (a fraction of the run), then class-balanced."""
    return class_balanced_weights(counts) if progress >= start else None


def ldam_margins(counts, largest: float) -> torch.Tensor:
    """LDAM's per-class margins, proportional to n_c^(-1/4), the largest equal to ``largest``."""
    m = torch.as_tensor(counts, dtype=torch.float64) ** -0.25
    return (m * (largest / m.max())).float()


def loss_fn(method: str, logits, y, counts, progress: float, args, mix=None):
    """The training loss of a loss-side ``method`` at ``progress`` (fraction of the run done).
    ``mix = (lam, y_b)``: the batch was mixed as ``lam * x + (1 - lam) * x[perm]`` (mixup)."""
    counts = torch.as_tensor(counts).tolist()
    weight = drw_weights(counts, progress, args.drw_start) if method in ("drw", "ldam_drw", "mixup_drw") else (
        class_balanced_weights(counts) if method == "cb_loss" else None)
    weight = None if weight is None else weight.to(logits.device)
    if method == "ldam_drw":
        margins = ldam_margins(counts, args.ldam_margin).to(logits.device)
        logits = args.ldam_s * (logits - F.one_hot(y, logits.shape[1]) * margins[y][:, None])
    if method == "balanced_softmax":
        prior = torch.as_tensor(counts, dtype=torch.float32, device=logits.device) / float(sum(counts))
        logits = logits + args.la_tau * prior.log()
    loss = F.cross_entropy(logits, y, weight=weight)
    if mix is not None:
        lam, y_b = mix
        loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y_b, weight=weight)
    return loss


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, g: torch.Generator):
    """``(mixed batch, (lam, partner labels))``: one Beta(alpha, alpha) weight per batch, as in Zhang et al."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
    perm = torch.randperm(len(x), generator=g).to(x.device)
    return lam * x + (1 - lam) * x[perm], (lam, y[perm])


# -- data ------------------------------------------------------------------------------------------
def validation_split(lt, fraction: float, seed: int):
    """``(fit, val)``: ``fraction`` of each class of ``lt`` held out (at least one image per class
    when ``fraction > 0``, none from a class of one), seeded; ``val`` is None when fraction is 0."""
    if fraction <= 0:
        return lt, None
    kept, held = stratified_holdout(lt.targets, fraction, seed + 7919, at_least_one=True)
    return lt.subset(kept), lt.subset(held)


def splits(args):
    """(fit, val or None, test) for the run's settings."""
    lt, test = long_tailed_split(args.data, args.rho, args.split_seed, args.class_order, args.profile)
    fit, val = validation_split(lt, args.val_fraction if args.epochs else 0.0, args.split_seed)
    return fit, val, test


def export_split(args, path) -> None:
    """Write the long-tailed training split (without its validation part) as an ``.npz`` that
    ``dkgm-aug train --data`` reads, so a generator can be trained on exactly what the
    classifiers see (and nothing more)."""
    lt, _, _ = splits(args)
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


def to_input(x: torch.Tensor, size: int | None, device=None) -> torch.Tensor:
    x = x.to(device).float() / 255.0
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5


class Pool:
    """What a method draws its batches from: uint8 images and labels, optional per-item
    sampling weights (None = uniform), or a balanced wrapper that generates on first draw."""

    def __init__(self, images, targets, weights=None, balanced=None):
        self.images, self.targets, self.weights, self.balanced = images, targets, weights, balanced
        self.draw_s = 0.0

    def __len__(self):
        return len(self.balanced) if self.balanced is not None else len(self.images)

    def draw(self, n: int, g: torch.Generator):
        idx = (torch.multinomial(self.weights, n, replacement=True, generator=g) if self.weights is not None
               else torch.randint(len(self), (n,), generator=g))
        if self.balanced is None:
            return self.images[idx], self.targets[idx]
        start = time.perf_counter()
        items = self.balanced.__getitems__(idx.tolist())   # one generator call for the batch's new items
        self.draw_s += time.perf_counter() - start
        # Items are float [0, 1] tensors on the 256-level grid (real ones /255, synthetic quantized).
        return (torch.stack([(x * 255).round().to(torch.uint8) for x, _ in items]),
                torch.as_tensor([int(y) for _, y in items]))

    @property
    def n_generated(self) -> int:
        return 0 if self.balanced is None else self.balanced.n_generated


def generator_for(method: str, args, lt, seed: int):
    """The generator behind a balanced method: a checkpoint name/path, or a model built here."""
    if method in ("dkgm_balanced", *AUGMENTED):
        return args.generator or SHIPPED[args.data]
    if method == "kss_balanced":
        from dkgm_aug.kss import KernelSmoothedScore
        return KernelSmoothedScore.from_dataset(lt, h=args.kss_h, steps=args.kss_steps)
    if args.evae:
        return args.evae
    from dkgm_aug.vae import EVAE, fit
    torch.manual_seed(seed)
    model = EVAE(channels=lt.images.shape[1], image_size=lt.images.shape[-1], d_z=args.evae_dz)
    fit(model, lt.images, epochs=args.evae_epochs, seed=seed, progress=False,
        max_batches=2 if args.quick else None)
    return model


def label_filter(args):
    """A fresh LabelFilter (its own rejection counters) for one run, or None without --label-filter;
    its classifier runs where the generator does."""
    if not args.label_filter:
        return None
    f = LabelFilter(args.label_filter)
    f.classifier.to(args.device)
    return f


def neighbour_bank(args, lt, minority):
    """``--bank K``: K neighbours of every minority-class training image, made once with bank seed 0
    (so every classifier seed sees the same neighbours) into a resumable folder of shards under
    ``--out``, reopened by its fingerprint (generator, knobs, filter, images) by later runs."""
    from dkgm_aug import NeighbourBank
    indices = torch.nonzero(minority[lt.targets]).flatten()
    gen = generator_for("ros_dkgm", args, lt, 0)
    stem = f"{Path(str(gen)).stem}-k{args.bank}" + ("-filtered" if args.label_filter else "")
    bank = NeighbourBank(lt, gen, k=args.bank, indices=indices, seed=0, device=args.device,
                         label_filter=label_filter(args), path=Path(args.out) / "banks" / stem)
    return bank.build(progress=not args.quick)


def rejection_share(*filters) -> str:
    """Share of drawn neighbours the runs' label filters rejected ('' without a filter)."""
    filters = [f for f in filters if f is not None]
    drawn = sum(sum(f.drawn.values()) for f in filters)
    return f"{sum(sum(f.rejected.values()) for f in filters) / drawn:.4f}" if drawn else ""


def build_pool(method: str, args, lt, seed: int) -> Pool:
    images, targets = lt.images, lt.targets
    counts = torch.bincount(targets, minlength=10)
    if method in ("ros", "ros_dkgm"):
        return Pool(images, targets, 1.0 / counts[targets].double())
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
        return Pool(torch.from_numpy(X), torch.from_numpy(y.astype(np.int64)))
    if method in BALANCED:
        return Pool(images, targets, balanced=BalancedDKGMDataset(
            lt, generator=generator_for(method, args, lt, seed), sampling_strategy="auto", seed=seed,
            cache="memory", progress=False, device=args.device, label_filter=label_filter(args)))
    return Pool(images, targets)


# -- one run ---------------------------------------------------------------------------------------
def build_model(args):
    import timm
    kwargs = dict(channels=tuple(args.channels)) if args.channels else {}
    return timm.create_model(args.model, num_classes=10, in_chans=1, pretrained=False, **kwargs)


@torch.no_grad()
def predict(model, images, size) -> torch.Tensor:
    device = next(model.parameters()).device
    with evaluating(model):
        return torch.cat([model(to_input(images[i:i + 512], size, device)).argmax(1).cpu()
                          for i in range(0, len(images), 512)])


def balanced_accuracy(y_true, y_pred, n_classes: int = 10) -> float:
    return float(np.nanmean(per_class_recall(y_true, y_pred, n_classes)))


class Augmenter:
    """The per-batch augmentation of a method: base shift, then RandAugment or DKGMAugment."""

    def __init__(self, method, args, lt, counts, seed):
        from torchvision.transforms import v2
        self.shift, self.minority = args.shift, counts < counts.max()   # "minority": every class but the largest
        self.randaug = v2.RandAugment() if method == "randaug" else None
        online, banked = method in AUGMENTED and not args.bank, method in AUGMENTED and bool(args.bank)
        self.dkgm = (DKGMAugment(generator_for(method, args, lt, seed), p=args.dkgm_p, seed=seed, device=args.device,
                                 label_filter=label_filter(args)) if online else None)
        self.bank = BankAugment(neighbour_bank(args, lt, self.minority), p=args.dkgm_p, seed=seed) if banked else None
        self.seconds, self.n_changed = 0.0, 0

    def __call__(self, x, y, g):
        x = self.neighbours(self.bank, x, y)      # the bank knows the unshifted pixels: it goes first
        x = random_shift(x, self.shift, g)
        if self.randaug is not None:   # per image, so each gets its own ops (a batch call shares them)
            x = torch.stack([self.randaug(im) for im in x])
        return self.neighbours(self.dkgm, x, y)

    def neighbours(self, transform, x, y):
        """The minority items of the uint8 batch ``x`` (labels ``y``, on the CPU) through ``transform``
        (each replaced with probability p), in place; timed, and the changed items counted."""
        m = self.minority[y]
        if transform is None or not m.any():
            return x
        t, before = time.perf_counter(), x[m]
        x[m] = transform(before)
        self.seconds += time.perf_counter() - t
        self.n_changed += int((x[m] != before).flatten(1).any(1).sum())
        return x


def run(method: str, args, seed: int, curves: Path | None = None) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    lt, val, test = splits(args)
    counts = torch.bincount(lt.targets, minlength=10)
    start = time.perf_counter()
    pool = build_pool("dkgm_balanced" if method == "dkgm_deferred" else method, args, lt, seed)
    plain = Pool(lt.images, lt.targets) if method == "dkgm_deferred" else pool
    setup_s = time.perf_counter() - start
    size = args.size if args.data == "digits" else None
    loss_method = args.combine_loss if method == "loss_dkgm" else method if method in LOSSES else "ce"
    per_epoch = -(-len(lt) // args.batch)
    total = args.epochs * per_epoch if args.epochs else args.steps

    model = build_model(args).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    augment = Augmenter(method, args, lt, counts, seed)
    best, history, epoch_loss = (-1.0, 0, None), [], []
    start = time.perf_counter()
    model.train()
    for step in range(total):
        progress = step / total
        source = plain if method == "dkgm_deferred" and progress < args.drw_start else pool
        x, y = source.draw(args.batch, g)
        x, y, mix = to_input(augment(x, y, g), size, args.device), y.to(args.device), None
        if loss_method in ("mixup", "mixup_drw"):
            x, mix = mixup(x, y, args.mixup_alpha, g)
        loss = loss_fn(loss_method, model(x), y, counts, progress, args, mix)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        epoch_loss.append(loss.item())
        if args.epochs and (step + 1) % per_epoch == 0:
            epoch = (step + 1) // per_epoch
            val_bacc = balanced_accuracy(val.targets.numpy(), predict(model, val.images, size).numpy())
            history.append(dict(method=method, seed=seed, epoch=epoch, train_loss=round(float(np.mean(epoch_loss)), 5),
                                val_bacc=round(val_bacc, 5)))
            epoch_loss = []
            if val_bacc > best[0]:   # the first best epoch: later ties add nothing the validation set can see
                best = (val_bacc, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    gen_s = pool.draw_s + augment.seconds
    train_s = time.perf_counter() - start - gen_s
    if best[2] is not None:
        model.load_state_dict(best[2])
    if curves is not None and history:
        append_curves(curves, history, config_of(args))
    pred = predict(model, test.images, size)     # the test split, read once
    res = metrics(test.targets.numpy(), pred.numpy(), 10, tail_classes(counts.tolist()))
    return dict(method=method, seed=seed, **config_of(args), n_train=len(lt), n_pool=len(pool),
                n_generated=pool.n_generated + augment.n_changed, rejected=rejection_share(
                    pool.balanced and pool.balanced.label_filter, augment.dkgm and augment.dkgm.label_filter),
                final_loss=round(loss.item(), 4),
                train_s=round(train_s, 2), setup_s=round(setup_s, 2), generate_s=round(gen_s, 2),
                knobs=knobs_of(method, args), hardware=hardware(args.device), chosen_epoch=best[1] if args.epochs else "", val_bacc=round(best[0], 5) if args.epochs else "", **res)


def locked_append(path: Path, fields: list, rows: list) -> None:
    """Append ``rows`` to the CSV at ``path`` (the header first when the file is empty) under an
    exclusive lock, so parallel runs sharing one file never write two headers or interleave."""
    import fcntl
    line = io.StringIO()
    w = csv.DictWriter(line, fieldnames=fields, restval="")
    w.writerows(rows)
    with open(path, "a", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if os.fstat(f.fileno()).st_size == 0:     # checked under the lock: another run may have just written
            csv.DictWriter(f, fieldnames=fields).writeheader()
        f.write(line.getvalue())


def append_curves(path: Path, history: list, config: dict) -> None:
    key = ";".join(f"{k}={v}" for k, v in config.items())
    locked_append(path, ["method", "seed", "epoch", "train_loss", "val_bacc", "config"],
                  [dict(h, config=key) for h in history])


# Each method's knobs: variants of one method are rows with other values; the converged report
# keeps the variant with the best validation balanced accuracy.
KNOBS = {"drw": ("drw_start",), "ldam_drw": ("drw_start", "ldam_margin", "ldam_s"), "balanced_softmax": ("la_tau",),
         "mixup": ("mixup_alpha",), "mixup_drw": ("mixup_alpha", "drw_start"), "dkgm_balanced": ("generator",),
         "dkgm_augment": ("generator", "dkgm_p"), "ros_dkgm": ("generator", "dkgm_p"),
         "loss_dkgm": ("generator", "combine_loss", "dkgm_p"), "dkgm_deferred": ("generator", "drw_start"),
         "evae_balanced": ("evae",), "kss_balanced": ("kss",)}
for _m in GENERATIVE:      # a label filter is a knob of every generative method (shown only when set)
    KNOBS[_m] += ("label_filter",)
for _m in AUGMENTED:       # so is a neighbour bank of the methods that augment batches (shown only when set)
    KNOBS[_m] += ("bank",)


def knob_value(name: str, args):
    """A knob as the report shows it: the generators resolved to what the run used."""
    if name == "generator":
        return args.generator or SHIPPED[args.data]
    if name == "evae":
        return args.evae or f"fitted here ({args.evae_epochs} epochs)"
    if name == "label_filter":
        return args.label_filter or "none"
    if name == "kss":
        return f"h={args.kss_h}, steps={args.kss_steps}"
    return getattr(args, name)


def knobs_of(method: str, args) -> str:
    names = KNOBS.get(method, ())
    if method == "loss_dkgm":
        names = names + KNOBS.get(args.combine_loss, ())
    return " ".join(f"{n}={knob_value(n, args)}" for n in dict.fromkeys(names)
                    if (n != "label_filter" or args.label_filter) and (n != "bank" or args.bank))


def config_of(args) -> dict:
    """The settings a row depends on, but for its method's knobs; the report only pools rows
    whose settings match. The converged protocol (``--epochs``) adds its own."""
    cfg = dict(data=args.data, rho=args.rho, split_seed=args.split_seed, model=args.model, steps=args.steps,
               batch=args.batch, generator=knob_value("generator", args), evae=knob_value("evae", args),
               kss=knob_value("kss", args), dkgm_p=args.dkgm_p)
    if getattr(args, "epochs", None):   # generators and dkgm_p are knobs of their methods here
        for key in ("dkgm_p", "generator", "evae", "kss"):
            del cfg[key]
        cfg.update(steps="", epochs=args.epochs, val_fraction=args.val_fraction, class_order=args.class_order,
                   profile=args.profile, channels=" ".join(map(str, args.channels or ())), lr=args.lr)
    return cfg


# -- reporting -------------------------------------------------------------------------------------
FIELDS = ["method", "seed", "data", "rho", "split_seed", "model", "steps", "batch", "generator", "evae", "kss", "dkgm_p",
          "n_train", "n_pool", "n_generated", "final_loss", "train_s", "setup_s", "generate_s", "accuracy",
          "macro_f1", "tail_recall", "class_recall", "epochs", "val_fraction", "class_order", "profile", "channels",
          "lr", "knobs", "chosen_epoch", "val_bacc", "rejected", "hardware"]
NUMBERS = ("accuracy", "macro_f1", "tail_recall", "train_s", "setup_s", "generate_s", "n_generated")


def append_row(path: Path, row: dict) -> None:
    """One line per finished run, written in one call, so a crash loses at most the run in flight
    and two processes can share the file."""
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader)
        if reader.fieldnames != FIELDS:     # written by an older version: rewrite once with the new columns
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS, restval="", extrasaction="ignore")
                w.writeheader()
                w.writerows(old)
            os.replace(tmp, path)
    locked_append(path, FIELDS, [row])


def read_rows(path: Path, config: dict) -> list:
    """The rows of ``path`` whose settings equal ``config``, numbers parsed; a rerun of a
    (method, knobs, seed) replaces the older row."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["dkgm_p"] = r.get("dkgm_p") or "0.5"      # rows from before --dkgm-p existed used 0.5
        r["knobs"] = r.get("knobs") or ""
    rows = [r for r in rows if all(r.get(k, "") == str(v) for k, v in config.items())]
    for r in rows:
        r.update({k: float(r[k]) for k in NUMBERS}, seed=int(r["seed"]),
                 val_bacc=float(r["val_bacc"]) if r.get("val_bacc") else None)
    latest = {(r["method"], r["knobs"], r["seed"]): r for r in rows}
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(latest.values(), key=lambda r: (order.get(r["method"], len(order)), r["knobs"], r["seed"]))


def select_knobs(rows: list) -> tuple:
    """``(rows of each method's chosen variant, {method: (knobs, mean val bacc, variants tried)})``:
    the variant with the best mean validation balanced accuracy (the only one when there is no
    validation split)."""
    chosen, keep = {}, []
    for m in dict.fromkeys(r["method"] for r in rows):
        variants = {}
        for r in rows:
            if r["method"] == m:
                variants.setdefault(r["knobs"], []).append(r)
        score = {k: np.mean([r["val_bacc"] for r in rs]) if all(r["val_bacc"] is not None for r in rs) else -1.0
                 for k, rs in variants.items()}
        best = max(variants, key=lambda k: (score[k], len(variants[k])))
        chosen[m] = (best, score[best], len(variants))
        keep += variants[best]
    return keep, chosen


def paired_difference(rows: list, method: str, baseline: str) -> tuple:
    """Mean and std over shared seeds of ``method``'s accuracy minus ``baseline``'s."""
    acc = {(r["method"], r["seed"]): r["accuracy"] for r in rows}
    d = [acc[(method, s)] - acc[(baseline, s)] for (m, s) in acc if m == method and (baseline, s) in acc]
    return (float(np.mean(d)), float(np.std(d)), len(d)) if d else (float("nan"), float("nan"), 0)


def summarise(rows: list) -> dict:
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        out[m] = {k: (float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs]))) for k in NUMBERS}
        out[m]["seeds"] = sorted(r["seed"] for r in rs)
    return out


def hardware(device="cpu") -> str:
    where = (f"classifier on {torch.cuda.get_device_name()}" if str(device).startswith("cuda")
             and torch.cuda.is_available() else "CPU only")
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__}, {where}"


def trained_on(spec: str) -> str:
    """A checkpoint's own record of its training data."""
    from dkgm_aug import load
    try:
        return load(spec).info.get("training", {}).get("data", "unknown")
    except Exception as exc:   # the report must still be written
        return f"unreadable ({exc})"


def class_recall_table(rows: list, summary: dict, counts: list) -> list:
    """Mean recall of each class over the seeds, for the methods whose rows all logged it."""
    lines = ["", "Recall per class (mean over the seeds; training images per class in the header):", "",
             "| method | " + " | ".join(f"{c} ({n})" for c, n in enumerate(counts)) + " |",
             "|---|" + "---|" * len(counts)]
    for m in summary:
        logged = [r["class_recall"] for r in rows if r["method"] == m]
        if logged and all(logged):
            mean = np.mean([[float(v) for v in c.split(";")] for c in logged], axis=0)
            lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in mean) + " |")
    return lines if len(lines) > 5 else []


def protocol_lines(args, cfg, counts, rows=()) -> list:
    lines = [f"- data: {args.data}, train split long-tailed with rho={args.rho} ({args.profile} profile, class order "
             f"{args.class_order}, split seed {args.split_seed}, class counts {counts}); "
             f"test balanced, so accuracy = balanced accuracy; tail classes (rarest third): {args.tail}",
             f"- model: timm `{args.model}`" + (f" with channels {tuple(args.channels)}" if args.channels else "")
             + " from scratch, in_chans=1" + (f", 8x8 inputs upsampled to {args.size}x{args.size}"
                                              if args.data == "digits" else "")]
    if args.epochs:
        lines += [f"- {args.epochs} epochs of Adam (lr {args.lr}, cosine), batch {args.batch}; validation: "
                  f"{args.val_fraction:g} of each class of the long-tailed split held out (long-tailed too); the "
                  "weights of the best validation epoch are tested, once; per method, the knob variant with the best "
                  "mean validation balanced accuracy is shown (`knobs`); loss curves: `curves.csv`, `curves.png`"]
    else:
        lines += [f"- {args.steps} Adam steps (lr {args.lr}, cosine), batch {args.batch}"]
    return lines + [
        f"- base aug: random shift <= {args.shift} px, the same for every method",
        f"- DKGM generator: `{knob_value('generator', args)}`, trained on: {trained_on(knob_value('generator', args))}",
        f"- EVAE: {knob_value('evae', args)}; kernel-smoothed score: {knob_value('kss', args)}, built from the "
        "long-tailed split",
        f"- threads per run: {args.threads}; hardware of the runs: "
        + "; ".join(sorted({r.get("hardware") or "not recorded" for r in rows} or {hardware(args.device)})),
        "- mean ± std over the seeds listed; `vs best` is the paired difference in accuracy to the best "
        "non-generative method over shared seeds; `generate s` is time spent making synthetic images, "
        "`train s` the rest of the training loop"]


def variants_table(rows: list) -> list:
    """Every knob variant of the methods that tried more than one, chosen or not (the chosen one
    is the best mean validation balanced accuracy); test accuracy is shown for the record only."""
    variants = {}
    for r in rows:
        variants.setdefault(r["method"], {}).setdefault(r["knobs"], []).append(r)
    lines = ["", "Knob variants tried (per method, the best `val bacc` is the row above; test accuracy shown "
             "for the record, never used to choose):", "",
             "| method | knobs | val bacc | accuracy | tail recall | rejected by the filter | seeds |",
             "|---|---|---|---|---|---|---|"]
    for m, by_knobs in variants.items():
        if len(by_knobs) < 2:
            continue
        for knobs, rs in by_knobs.items():
            val = [r["val_bacc"] for r in rs if r["val_bacc"] is not None]
            rej = [float(r["rejected"]) for r in rs if r.get("rejected")]
            ms = lambda k: f"{np.mean([r[k] for r in rs]):.3f} ± {np.std([r[k] for r in rs]):.3f}"
            lines.append(f"| {m} | {knobs or '-'} | {f'{np.mean(val):.3f}' if val else '-'} | {ms('accuracy')} | "
                         f"{ms('tail_recall')} | {f'{np.mean(rej):.3f}' if rej else '-'} | "
                         f"{sorted(r['seed'] for r in rs)} |")
    return lines if len(lines) > 5 else []


def write_outputs(rows: list, args, out: Path) -> None:
    all_rows = rows
    rows, chosen = select_knobs(rows)
    s = summarise(rows)
    cfg = config_of(args)
    lt, _, _ = splits(args)
    counts = torch.bincount(lt.targets, minlength=10).tolist()
    commands = (out / "commands.txt").read_text().splitlines() if (out / "commands.txt").exists() else []
    plain = [m for m in s if m not in GENERATIVE]
    # the baseline of `vs best`: by validation balanced accuracy where there is one, never by test accuracy
    best = max(plain, key=lambda m: (chosen[m][1], len(s[m]["seeds"])) if args.epochs else s[m]["accuracy"][0],
               default=None)
    lines = ["# Long-tailed classification benchmark", "", "Commands (each appended rows to `runs.csv`):", ""]
    lines += [f"    {c}" for c in commands] + [""] + protocol_lines(args, cfg, counts, rows) + [
        f"- best non-generative method{' (by validation balanced accuracy)' if args.epochs else ''}: {best}", "",
        "| method | accuracy | vs best (paired) | macro-F1 | tail recall | knobs | val bacc | epoch | train s | "
        "generate s | seeds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, v in s.items():
        f = lambda k, d=3: f"{v[k][0]:.{d}f} ± {v[k][1]:.{d}f}"
        d, sd, n = paired_difference(rows, m, best) if best and m != best else (float("nan"),) * 2 + (0,)
        ep = [r["chosen_epoch"] for r in rows if r["method"] == m and r.get("chosen_epoch")]
        knobs, val, tried = chosen[m]
        lines.append(f"| {m} | {f('accuracy')} | {f'{d:+.3f} ± {sd:.3f}' if n else '-'} | {f('macro_f1')} | "
                     f"{f('tail_recall')} | {knobs or '-'}{f' (of {tried})' if tried > 1 else ''} | "
                     f"{f'{val:.3f}' if val >= 0 else '-'} | {'/'.join(ep) or '-'} | {v['train_s'][0]:.0f} | "
                     f"{v['generate_s'][0]:.0f} | {v['seeds']} |")
    lines += class_recall_table(rows, s, counts) + variants_table(all_rows)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_results(s, args, out)
    if (out / "curves.csv").exists():
        plot_curves(out / "curves.csv", cfg, out / "curves.png")


def plot_results(s: dict, args, out: Path) -> None:
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
    n_seeds = max(len(v["seeds"]) for v in s.values())
    budget = f"{args.epochs} epochs" if args.epochs else f"{args.steps} steps"
    ax.set_title(f"{args.data}, rho={args.rho:g}, {args.model}, {budget}, up to {n_seeds} seed(s)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    plt.close(fig)


def plot_curves(path: Path, cfg: dict, png: Path) -> None:
    """Mean training loss and validation balanced accuracy per epoch, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    def matches(config: str) -> bool:   # rows written with more settings than cfg names still match
        saved = dict(item.split("=", 1) for item in config.split(";") if "=" in item)
        return all(saved.get(k) == str(v) for k, v in cfg.items())
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if matches(r["config"])]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        by_epoch = {}
        for r in rows:
            if r["method"] == m:
                by_epoch.setdefault(int(r["epoch"]), []).append((float(r["train_loss"]), float(r["val_bacc"])))
        ep = sorted(by_epoch)
        for ax, i in zip(axes, (0, 1)):
            ax.plot(ep, [np.mean([v[i] for v in by_epoch[e]]) for e in ep], label=m)
    axes[0].set(xlabel="epoch", ylabel="training loss (mean over the epoch)", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="validation balanced accuracy")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=sorted(SHIPPED), default="digits")
    p.add_argument("--rho", type=float, default=100)
    p.add_argument("--split-seed", type=int, default=0, help="fixes the long-tailed split (and digits' test split)")
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--shift", type=int, default=1, help="base augmentation: max random shift in px")
    p.add_argument("--size", type=int, default=32, help="digits are upsampled to this size")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--generator", help="DKGM checkpoint for the dkgm_* methods (default: the shipped one)")
    p.add_argument("--evae", help="EVAE checkpoint for evae_balanced (default: fit one on the split per seed)")
    p.add_argument("--evae-epochs", type=int, default=4)
    p.add_argument("--evae-dz", type=int, default=32)
    p.add_argument("--dkgm-p", type=float, default=0.5, help="DKGMAugment's p in dkgm_augment and ros_dkgm")
    p.add_argument("--bank", type=int, default=0, metavar="K",
                   help="augmented rows (dkgm_augment, ros_dkgm, loss_dkgm) draw from a bank of K neighbours per "
                        "minority image, made once and shared by seeds and methods, instead of generating online")
    p.add_argument("--label-filter", metavar="EVALUATOR", default=None,
                   help="generative methods: reject neighbours this classifier (a shipped evaluator name or a "
                        "FeatureNet file) puts in another class; one that saw the full training split is an upper bound")
    p.add_argument("--kss-h", type=float, default=1.0, help="kernel-smoothed score bandwidth")
    p.add_argument("--kss-steps", type=int, default=10, help="kernel-smoothed score reverse steps")
    p.add_argument("--epochs", type=int, default=None,
                   help="converged protocol: train this many passes, choose the epoch on the validation split")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of each class held out for validation (with --epochs)")
    p.add_argument("--class-order", default="natural",
                   help="which classes form the head and the tail: natural, reversed or perm:<seed>")
    p.add_argument("--profile", choices=PROFILES, default="exp",
                   help="exp: CIFAR-LT exponential counts; step: half the classes keep n_max, half n_max/rho")
    p.add_argument("--channels", type=int, nargs="+", default=None,
                   help="timm ResNet stage widths (e.g. 32 64 128 256: a half-width resnet10t)")
    p.add_argument("--drw-start", type=float, default=0.8,
                   help="fraction of the run after which drw/ldam_drw/mixup_drw re-weight and dkgm_deferred draws neighbours")
    p.add_argument("--ldam-margin", type=float, default=0.5, help="LDAM's largest margin")
    p.add_argument("--ldam-s", type=float, default=30.0, help="LDAM's logit scale")
    p.add_argument("--la-tau", type=float, default=1.0, help="logit adjustment's tau (1 = Balanced Softmax)")
    p.add_argument("--mixup-alpha", type=float, default=1.0, help="mixup's Beta(alpha, alpha)")
    p.add_argument("--combine-loss", choices=LOSSES, default="balanced_softmax",
                   help="the loss-side method loss_dkgm combines with DKGMAugment")
    p.add_argument("--device", default="cpu", help="where the classifier (and the generators) run: cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="skip (method, knobs, seed) runs already in runs.csv")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from runs.csv, run nothing")
    p.add_argument("--export-split", metavar="NPZ", help="write the long-tailed train split and exit")
    p.add_argument("--quick", action="store_true", help="digits, rho 10, 10 steps, batch 16, seed 0 (smoke test)")
    p.add_argument("--out", default="benchmarks/results/imbalanced")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.rho, args.steps, args.batch, args.seeds = "digits", 10, 10, 16, [0]
        args.kss_steps, args.evae_epochs = 2, 1
    if args.export_split:
        export_split(args, args.export_split)
        print(f"wrote {args.export_split}")
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        with open(out / "commands.txt", "a") as f:
            f.write(f"python benchmarks/imbalanced.py {' '.join(argv)}\n")
    lt, _, _ = splits(args)
    args.tail = tail_classes(torch.bincount(lt.targets, minlength=10).tolist())

    done = ({(r["method"], r["knobs"], r["seed"]) for r in read_rows(out / "runs.csv", config_of(args))}
            if args.resume else set())
    jobs = [(m, s) for s in args.seeds for m in args.methods if (m, knobs_of(m, args), s) not in done
            and not args.report_only]
    for m, s in (bar := tqdm(jobs, desc="runs")):
        bar.set_postfix(method=m, seed=s)
        row = run(m, args, s, curves=out / "curves.csv")
        append_row(out / "runs.csv", row)
        tqdm.write(f"{m:>14} seed {s}: acc {row['accuracy']:.3f}  tail recall {row['tail_recall']:.3f}  "
                   f"(train {row['train_s']:.0f} s, generate {row['generate_s']:.0f} s)")
    write_outputs(read_rows(out / "runs.csv", config_of(args)), args, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
