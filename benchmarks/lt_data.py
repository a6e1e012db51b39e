"""What the long-tailed benchmark's classifiers see: the splits (fit, validation, test) and the
``--export-split`` file, the base augmentation and the model input, the pool each method draws
its batches from (``build_pool``), the generators, label filters and neighbour banks behind
the generative methods, and the per-batch ``Augmenter``."""
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dkgm_aug import BalancedDKGMDataset, BankAugment, DKGMAugment, LabelFilter
from dkgm_aug.data import stratified_holdout
from common import SHIPPED, long_tailed_split
from lt_losses import AUGMENTED, BALANCED


# -- splits ----------------------------------------------------------------------------------------
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
    """Write the long-tailed training split as an ``.npz`` that ``dkgm-aug train --data`` reads, so a
    generator can be trained on exactly what the classifiers see (and nothing more): without its
    validation part when ``--epochs`` carves one (the converged protocol); without ``--epochs`` (the
    step-budget protocol, which has no validation split) the whole split, so a generator exported
    that way must not serve converged rows, whose validation images it would have seen."""
    lt, _, _ = splits(args)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=lt.images.permute(0, 2, 3, 1).numpy(), labels=lt.targets.numpy())


# -- images ----------------------------------------------------------------------------------------
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


# -- what a method draws from ----------------------------------------------------------------------
class Pool:
    """What a method draws its batches from: uint8 images and labels, optional per-item
    sampling weights (None = uniform), or a balanced wrapper that generates on first draw."""

    def __init__(self, images, targets, weights=None, balanced=None):
        self.images, self.targets, self.weights, self.balanced = images, targets, weights, balanced
        self.draw_s = 0.0

    def __len__(self):
        return len(self.balanced) if self.balanced is not None else len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Before each epoch: a bank-backed balanced wrapper then shows each synthetic item another neighbour."""
        if self.balanced is not None:
            self.balanced.set_epoch(epoch)

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
    its classifier runs where the generator does. Built under a forked torch RNG, so a filtered row
    starts its classifier from the same weights as the unfiltered one and its copy control."""
    if not args.label_filter:
        return None
    with torch.random.fork_rng(devices=[]):   # building the classifier must not move the rows' RNG (see neighbour_bank)
        f = LabelFilter(args.label_filter)
    f.classifier.to(args.device)
    return f


def minority_classes(counts: torch.Tensor) -> torch.Tensor:
    """The classes DKGM adds neighbours to, as a mask over class indices: every class but the largest."""
    return counts < counts.max()


def neighbour_bank(args, lt, minority):
    """``--bank K``: K neighbours of every minority-class training image, made once with bank seed 0
    (so every classifier seed sees the same neighbours) into a resumable folder of shards under
    ``--out``, reopened by its fingerprint (generator, knobs, filter, images) by later runs. Torch's
    global random state is the same after it whether the bank was built or reopened."""
    from dkgm_aug import NeighbourBank
    indices = torch.nonzero(minority[lt.targets]).flatten()
    gen = generator_for("ros_dkgm", args, lt, 0)
    stem = (f"{Path(str(gen)).stem}-k{args.bank}" + ("-filtered" if args.label_filter else "")
            + (f"-alpha{args.dkgm_alpha:g}" if args.dkgm_alpha is not None else "")
            + (f"-steps{args.dkgm_steps}" if args.dkgm_steps is not None else ""))
    bank = NeighbourBank(lt, gen, k=args.bank, indices=indices, seed=0, device=args.device, alpha=args.dkgm_alpha,
                         steps=args.dkgm_steps, label_filter=label_filter(args), path=Path(args.out) / "banks" / stem)
    # Building loads the generator, whose construction draws from torch's global RNG: without the fork,
    # a row that built the bank started its classifier from other weights than the same row with the
    # bank on disk (and than its copy control, drs), which broke the pairing over seeds.
    with torch.random.fork_rng(devices=[]):
        return bank.build(progress=not args.quick)


def rejection_share(*sources) -> str:
    """Share of drawn neighbours the run's label filters rejected ('' without a filter): counted by a
    filter while the run drew, or kept by a neighbour bank over the rows it was made with."""
    counts = [s.filter_counts if hasattr(s, "filter_counts") else {"drawn": s.drawn, "rejected": s.rejected}
              for s in sources if s is not None]
    counts = [c for c in counts if c is not None]
    drawn = sum(sum(c["drawn"].values()) for c in counts)
    return f"{sum(sum(c['rejected'].values()) for c in counts) / drawn:.4f}" if drawn else ""


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
        dkgm = method == "dkgm_balanced"   # with --bank, its synthetic items come from the shared bank
        bank = neighbour_bank(args, lt, minority_classes(counts)) if dkgm and args.bank else None
        return Pool(images, targets, balanced=BalancedDKGMDataset(
            lt, generator=generator_for(method, args, lt, seed), sampling_strategy="auto", seed=seed,
            alpha=args.dkgm_alpha if dkgm else None, steps=args.dkgm_steps if dkgm else None, bank=bank,
            cache="memory", progress=False, device=args.device, label_filter=label_filter(args)))
    return Pool(images, targets)


# -- the per-batch augmentation --------------------------------------------------------------------
class Augmenter:
    """The per-batch augmentation of a method: base shift, then RandAugment or DKGMAugment."""

    def __init__(self, method, args, lt, counts, seed):
        from torchvision.transforms import v2
        self.shift, self.minority = args.shift, minority_classes(counts)
        self.randaug = v2.RandAugment() if method == "randaug" else None
        online, banked = method in AUGMENTED and not args.bank, method in AUGMENTED and bool(args.bank)
        self.dkgm = (DKGMAugment(generator_for(method, args, lt, seed), alpha=args.dkgm_alpha, steps=args.dkgm_steps,
                                 p=args.dkgm_p, seed=seed,
                                 device=args.device, label_filter=label_filter(args)) if online else None)
        self.bank = BankAugment(neighbour_bank(args, lt, self.minority), p=args.dkgm_p, seed=seed) if banked else None
        self.seconds, self.n_changed = 0.0, 0

    def __call__(self, x, y, g):
        x = self.neighbours(self.bank, x, y, with_labels=True)   # the bank knows the unshifted pixels: it goes first
        x = random_shift(x, self.shift, g)
        if self.randaug is not None:   # per image, so each gets its own ops (a batch call shares them)
            x = torch.stack([self.randaug(im) for im in x])
        return self.neighbours(self.dkgm, x, y, with_labels=True)

    def neighbours(self, transform, x, y, with_labels: bool = False):
        """The minority items of the uint8 batch ``x`` (labels ``y``, on the CPU) through ``transform``
        (each replaced with probability p), in place; timed, and the changed items counted.
        ``with_labels``: the transform also takes the items' labels and returns ``(images, labels)``
        (DKGMAugment: a class-conditional generator needs them; BankAugment checks them against the
        classes its rows were made with); without, images only."""
        m = self.minority[y]
        if transform is None or not m.any():
            return x
        t, before = time.perf_counter(), x[m]
        x[m] = transform(before, y[m])[0] if with_labels else transform(before)
        self.seconds += time.perf_counter() - t
        self.n_changed += int((x[m] != before).flatten(1).any(1).sum())
        return x
