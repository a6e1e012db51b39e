"""How many of the converged benchmark's validation images the shipped Fashion-MNIST evaluator
trained on (the figure RESULTS.md gives for why a label-filter variant is an upper bound):

    python benchmarks/evaluator_overlap.py                 # rho 100, natural order, split seed 0
    python benchmarks/evaluator_overlap.py --rho 100 --class-order reversed

The evaluator's fit part is train_evaluator.py's (a stratified tenth held out, seed 0); the
validation part is the benchmark's own (lt_data.splits); images are matched by their pixels.
"""
import argparse

from dkgm_aug.data import fashion_mnist, stratified_holdout
from lt_data import splits


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rho", type=float, default=100.0)
    p.add_argument("--class-order", default="natural")
    p.add_argument("--profile", default="exp")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--evaluator-seed", type=int, default=0)
    args = p.parse_args(argv)
    evaluator_seed = args.evaluator_seed
    del args.evaluator_seed
    train = fashion_mnist(split="train")
    evaluator_fit, _ = stratified_holdout(train.targets, 0.1, evaluator_seed)
    seen = {train.images[i].numpy().tobytes() for i in evaluator_fit.tolist()}
    _, val, _ = splits(argparse.Namespace(data="fashion-mnist", epochs=1, **vars(args)))
    inside = sum(x.numpy().tobytes() in seen for x in val.images)
    print(f"evaluator fit images {len(evaluator_fit)}; validation images {len(val)}, of them in the evaluator's "
          f"fit part {inside}")


if __name__ == "__main__":
    main()
