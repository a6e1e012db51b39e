"""Train the evaluator classifiers: the one yardstick for label preservation and Frechet
distance (issue 11). One per dataset, trained once; every generator table uses it.

    OMP_NUM_THREADS=1 python benchmarks/train_evaluator.py --data fashion-mnist --epochs 15 --width 48
    OMP_NUM_THREADS=1 python benchmarks/train_evaluator.py --data digits --epochs 60 --width 48
    python benchmarks/train_evaluator.py --data digits --quick --out /tmp/ev    # the test's dry run

A seeded tenth of the training split (stratified) is held out as validation; the net trains
on the rest with AdamW, a cosine schedule and light augmentation (shifts of up to 2 pixels;
horizontal flips for Fashion-MNIST only: a flipped digit is another symbol). Validation
accuracy is logged after each epoch; the test split is read once, at the end. Writes
``evaluator_<data>.safetensors`` (a FeatureNet file: `dkgm_aug.features.load_feature_net`)
with the command, accuracies and wall time in its metadata, and ``evaluator_<data>.csv``.
"""
import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

import torch

from dkgm_aug.data import load_dataset, stratified_holdout
from dkgm_aug.features import accuracy, save_feature_net, train_feature_net

RESULTS = Path(__file__).resolve().parent / "results"
FLIP = {"fashion-mnist": True, "digits": False}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=sorted(FLIP), default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a few batches, for the test suite")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train, test = load_dataset(args.data, split="train"), load_dataset(args.data, split="test")
    fit_idx, val_idx = stratified_holdout(train.targets, 0.1, args.seed)
    fit, val = train.subset(fit_idx), train.subset(val_idx)
    if args.quick:
        fit, val, test = (d.subset(torch.arange(min(len(d), 256))) for d in (fit, val, test))
        args.epochs, args.width = 1, 8
    rows, t0 = [], time.perf_counter()

    def log(epoch, net):
        rows.append(dict(epoch=epoch, val_accuracy=round(accuracy(net, val), 4),
                         elapsed_s=round(time.perf_counter() - t0, 1)))
        print(f"epoch {epoch}: validation accuracy {rows[-1]['val_accuracy']:.4f} ({rows[-1]['elapsed_s']} s)",
              flush=True)

    net = train_feature_net(fit, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                            width=args.width, weight_decay=args.weight_decay, cosine=True, shift=2 if
                            train.images.shape[-1] > 8 else 1, flip=FLIP[args.data], progress=False, on_epoch=log)
    test_acc = accuracy(net, test)
    net.info.update(evaluator=dict(
        data=args.data, command="python benchmarks/train_evaluator.py " + " ".join(map(shlex.quote, argv)),
        val_accuracy=rows[-1]["val_accuracy"], test_accuracy=round(test_acc, 4), n_fit=len(fit), n_val=len(val),
        n_test=len(test), wall_time_s=round(time.perf_counter() - t0, 1), threads=args.threads))
    save_feature_net(net, out / f"evaluator_{args.data}.safetensors")
    with open(out / f"evaluator_{args.data}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{args.data}: test accuracy {test_acc:.4f}, validation {rows[-1]['val_accuracy']:.4f}; "
          f"wrote {out / f'evaluator_{args.data}.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
