"""Per-class label preservation of generators' neighbours, scored by the evaluator (issue 11).

Overall label preservation hides where neighbours cross classes: on Fashion-MNIST-LT the
confusable classes (T-shirt, Pullover, Coat, Shirt) are where a DKGM row loses to copies. This
scores, for each class, up to ``--per-class`` training images of the split the generators were
trained on: the share of neighbours the evaluator puts in the source's class, next to its
accuracy on the sources themselves. Every generator sees the same images and the same noise
seeds, at its own default (calibrated) alpha and steps unless ``--alphas`` names others; a
class-conditional one gets the labels.

    python benchmarks/class_fidelity.py --data runs/cond/lt_fit.npz --evaluator fashion-mnist-evaluator \
        --generators A.safetensors B.safetensors --out benchmarks/results/class_fidelity.csv
"""
import argparse
import csv
from pathlib import Path

import torch

from dkgm_aug.checkpoint import load
from dkgm_aug.data import load_dataset
from dkgm_aug.features import features
from dkgm_aug.images import from_model, tensor_unit, to_model
from dkgm_aug.kernels import noise_from_seeds
from dkgm_aug.label_filter import load_evaluator


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a shipped dataset name or an .npz (the generators' training split)")
    p.add_argument("--evaluator", required=True)
    p.add_argument("--generators", nargs="+", required=True)
    p.add_argument("--alphas", type=float, nargs="+", default=[None],
                   help="noise levels to score each generator at (default: its own calibrated alpha)")
    p.add_argument("--wrong-labels", action="store_true",
                   help="also give class-conditional generators each source's label + 1 (mod C): does the "
                        "neighbour follow the label it is given or the image it comes from?")
    p.add_argument("--per-class", type=int, default=100, help="sources per class (fewer where a class has fewer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the CSV to write")
    return p.parse_args(argv)


def sources(ds, per_class: int, seed: int) -> torch.Tensor:
    """Indices of up to ``per_class`` images of each class, seeded."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(ds.targets).tolist():
        idx = torch.nonzero(ds.targets == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks)


@torch.inference_mode()
def predictions(evaluator, x01: torch.Tensor) -> torch.Tensor:
    return evaluator.head(features(evaluator, x01)).argmax(1)


@torch.inference_mode()
def neighbours(model, x01: torch.Tensor, labels: torch.Tensor, seed: int, alpha=None) -> torch.Tensor:
    x = to_model(x01)
    eps = noise_from_seeds([seed * 1_000_003 + i for i in range(len(x))], x.shape[1:], model.kernel, x.device, x.dtype)
    cond = dict(labels=labels) if getattr(model, "conditional", False) else {}
    return torch.cat([from_model(model.sample(x[i:i + 256], alpha, eps=eps[i:i + 256],
                                              **{k: v[i:i + 256] for k, v in cond.items()}))
                      for i in range(0, len(x), 256)])


def share_row(what: str, pred, want, labels, classes) -> dict:
    """The share of predictions equal to ``want``, overall and per source class."""
    row = dict(what=what, all=f"{(pred == want).double().mean():.4f}")
    for c in torch.unique(labels).tolist():
        m = labels == c
        row[classes[c]] = f"{(pred[m] == want[m]).double().mean():.4f}"
    return row


def main(argv=None) -> int:
    args = parse(argv)
    ds = load_dataset(args.data, **({} if args.data.endswith(".npz") else dict(split="train")))
    evaluator = load_evaluator(args.evaluator)
    idx = sources(ds, args.per_class, args.seed)
    x01, labels = tensor_unit(ds.images[idx]), ds.targets[idx]
    scored, given = {"real sources": predictions(evaluator, x01)}, {}
    for spec in args.generators:
        model = load(spec).eval()
        for alpha in args.alphas:
            name = f"{Path(spec).stem} (alpha {model.alpha if alpha is None else alpha:g}, steps {model.steps})"
            scored[name] = predictions(evaluator, neighbours(model, x01, labels, args.seed, alpha))
            if args.wrong_labels and getattr(model, "conditional", False):
                shifted = (labels + 1) % model.num_classes
                pred = predictions(evaluator, neighbours(model, x01, shifted, args.seed, alpha))
                scored[f"{name}, given label + 1: in the source's class"] = pred
                given[f"{name}, given label + 1: in the given class"] = (pred, shifted)
    rows = [share_row(what, pred, labels, labels, ds.classes) for what, pred in scored.items()]
    rows += [share_row(what, pred, want, labels, ds.classes) for what, (pred, want) in given.items()]
    for row in rows:
        print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
