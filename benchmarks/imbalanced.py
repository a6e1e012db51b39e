"""Long-tailed image classification: does DKGM oversampling beat the usual rebalancing tricks?

    python benchmarks/imbalanced.py --data digits --rho 10 --steps 300 --seeds 0 1 2 \
        --out benchmarks/results/imbalanced_digits
    python benchmarks/imbalanced.py --quick --out /tmp/imb      # digits, all methods, 10 steps, 1 seed
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
  drs            deferred re-sampling (Cao et al. 2019): ce, then ros from --drw-start on; the
                 copy control of dkgm_deferred
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
``--bank K`` makes the DKGM rows (dkgm_balanced, dkgm_deferred, dkgm_augment, ros_dkgm, loss_dkgm) draw each neighbour from
a ``NeighbourBank`` of K neighbours per minority-class training image instead of generating it:
made once (bank seed 0, so every classifier seed sees the same neighbours, and with the label
filter when one is set) into ``<out>/banks/``, resumable shard by shard and reopened by its
fingerprint, so the generator's cost is paid once per generator and split, not per row. The
neighbour then replaces the image *before* the base shift (the bank knows images by their
pixels), where online generation works on the shifted image; a balanced row's synthetic item shows
another of its source's K neighbours each epoch. ``bank=K`` is a knob of those rows.
Rows are appended to ``runs.csv`` as each run ends (``--resume`` skips the done ones), and the
report is rebuilt from every row of that file with the same settings.

Digits are 8x8: they are upsampled (bilinear) to ``--size`` (default 32) inside the loop, after
all augmentation, because a ResNet's stride-32 downsampling would otherwise collapse them.
"""
import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from dkgm_aug.data import PROFILES
from common import SHIPPED, tail_classes
# the pieces, each a module beside this script: the methods and their losses (lt_losses), what the
# classifiers see (lt_data), one run (lt_run), the rows of runs.csv (lt_records), the report (lt_report)
from lt_data import export_split, splits
from lt_losses import LOSSES, METHODS
from lt_records import append_row, check_generators, config_of, knobs_of, read_rows
from lt_report import write_outputs
from lt_run import run


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--dkgm-alpha", type=float, default=None,
                   help="DKGM methods: the noise level alpha (default: the generator's own, calibrated one); a knob")
    p.add_argument("--dkgm-steps", type=int, default=None,
                   help="DKGM methods: stage-2 steps, 0 for stage-1 neighbours only (default: the generator's own); a knob")
    p.add_argument("--bank", type=int, default=0, metavar="K",
                   help="DKGM rows (dkgm_balanced, dkgm_deferred and the augmented ones) draw from a bank of K neighbours per "
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
                   help="fraction of the run after which drw/ldam_drw/mixup_drw re-weight, drs re-samples and dkgm_deferred "
                        "draws neighbours")
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
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
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

    kept = read_rows(out / "runs.csv", config_of(args))
    previous = kept if args.resume else []
    if not args.epochs and not args.report_only:   # the report could not choose between variants: say so now
        for m in args.methods:
            knobs = {r["knobs"] for r in kept if r["method"] == m} | {knobs_of(m, args)}
            if len(knobs) > 1:
                raise SystemExit(f"{out} holds {m} rows with other knobs ({', '.join(sorted(knobs))}) and there is no "
                                 "validation split (--epochs) to choose between them: use another --out")
    if not args.report_only:
        check_generators(previous, args, args.methods)
    done = {(r["method"], r["knobs"], r["seed"]) for r in previous}
    jobs = [(m, s) for s in args.seeds for m in args.methods if (m, knobs_of(m, args), s) not in done
            and not args.report_only]
    for m, s in (bar := tqdm(jobs, desc="runs")):
        bar.set_postfix(method=m, seed=s)
        row = run(m, args, s, curves=out / "curves.csv")
        append_row(out / "runs.csv", row)
        tqdm.write(f"{m:>14} seed {s}: acc {row['accuracy']:.3f}  tail recall {row['tail_recall']:.3f}  "
                   f"(train {row['train_s']:.0f} s, generate {row['generate_s']:.0f} s)")
    write_outputs(read_rows(out / "runs.csv", config_of(args), tail=args.tail), args, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
