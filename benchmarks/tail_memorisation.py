"""Are the synthetic tail-class images of the long-tailed benchmark new, or copies?

    python benchmarks/tail_memorisation.py --data fashion-mnist --rho 100 \
        --generator benchmarks/results/imbalanced_fmnist_rho100/fmnist-lt100-tiny.safetensors \
        --out benchmarks/results/imbalanced_fmnist_rho100/tail_memorisation.md
    python benchmarks/tail_memorisation.py --quick --out /tmp/tail.md     # digits, rho 10, 20 images per class

For each tail class (the rarest third) of ``imbalanced.py``'s long-tailed split, the first
``--n`` synthetic images that ``BalancedDKGMDataset`` (seed 0) makes with the DKGM generator
and with the kernel-smoothed-score sampler built the way ``imbalanced.py`` builds it, and
``--n`` real test images of the class as the baseline: memorisation (share whose nearest
training image of the class is closer than 1/3 of the second nearest) and the mean distance
to the nearest one ([-1, 1] pixel units).
"""
import argparse
import sys

import torch

from common import SHIPPED, long_tailed_split, tail_classes, write_lines
from dkgm_aug import BalancedDKGMDataset
from dkgm_aug.kss import KernelSmoothedScore, memorisation, nearest_neighbour_distances


def novelty(images, train) -> tuple:
    d, _ = nearest_neighbour_distances(images, train, k=2)
    return memorisation(images, train), float(d[:, 0].mean())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=sorted(SHIPPED), default="fashion-mnist")
    p.add_argument("--rho", type=float, default=100)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--generator", help="DKGM checkpoint (default: the shipped one for --data)")
    p.add_argument("--kss-h", type=float, default=1.0)
    p.add_argument("--kss-steps", type=int, default=10)
    p.add_argument("--n", type=int, default=150, help="images per class and source")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.rho, args.n, args.kss_steps = "digits", 10, 20, 2
    torch.set_num_threads(args.threads)
    lt, test = long_tailed_split(args.data, args.rho, args.split_seed)
    tail = tail_classes(torch.bincount(lt.targets, minlength=10).tolist())
    dkgm = args.generator or SHIPPED[args.data]
    generators = {f"DKGM `{dkgm}`": dkgm,
                  f"kernel-smoothed score, h={args.kss_h}, {args.kss_steps} steps":
                      KernelSmoothedScore.from_dataset(lt, h=args.kss_h, steps=args.kss_steps)}
    lines = ["# Tail-class synthetic images: new or copies?", "",
             f"Command: `python benchmarks/tail_memorisation.py {' '.join(argv)}`", "",
             f"{args.data}, rho={args.rho:g}, split seed {args.split_seed}; tail classes {tail}; "
             f"{args.n} images per class and source; threads {args.threads}.", "",
             "| source | class | real training images | memorisation | mean NN distance |", "|---|---|---|---|---|"]
    for name, g in generators.items():
        b = BalancedDKGMDataset(lt, generator=g, seed=0, progress=False)
        targets = b.targets
        for c in tail:
            idx = [i for i in range(b.n_real, len(b)) if targets[i] == c][:args.n]
            x = torch.stack([(im * 255).round().to(torch.uint8) for im, _ in b.__getitems__(idx)])
            mem, dist = novelty(x, lt.images[lt.targets == c])
            lines.append(f"| {name} | {c} | {int((lt.targets == c).sum())} | {mem:.3f} | {dist:.2f} |")
            print(lines[-1], flush=True)
    for c in tail:
        mem, dist = novelty(test.images[test.targets == c][:args.n], lt.images[lt.targets == c])
        lines.append(f"| real test images | {c} | {int((lt.targets == c).sum())} | {mem:.3f} | {dist:.2f} |")
    write_lines(args.out, lines)
    print("\n".join(lines[-len(tail):]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
