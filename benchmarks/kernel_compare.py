"""Stage-1 training noise: Gaussian vs Epanechnikov kernel at equal standard deviation.

    python benchmarks/kernel_compare.py --steps 300 --out benchmarks/results/kernel_compare.md [--quick]

Trains two stage-1 denoisers (``tiny`` preset, same seed, data order, steps and
alpha_train; only the noise kernel differs) on Fashion-MNIST (digits with --quick) and
compares, on held-out images, the KDE neighbours at alpha 0.25 / 0.5 / 1.0: sharpness,
MSE to the source image, and the Frechet distance to real held-out images in the feature
space of the dataset's yardstick classifier (``common.yardstick``; not FID).
"""
import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from dkgm_aug import DKGM, Trainer
from dkgm_aug.data import load_dataset
from dkgm_aug.features import features
from dkgm_aug.images import from_model, to_model
from dkgm_aug.metrics import frechet_distance, sharpness
from common import write_lines, yardstick

ALPHAS = (0.25, 0.5, 1.0)


def train_stage1(kernel, data, steps, batch, seed, work) -> DKGM:
    torch.manual_seed(seed)
    x0 = data[0][0]
    model = DKGM.from_preset("tiny", image_size=tuple(x0.shape[-2:]), channels=x0.shape[0], kernel=kernel)
    Trainer(model, data, out_dir=work / kernel, batch_size=batch, max_steps=steps, seed=seed,
            save_every=10 ** 9, progress=False, resume=False).fit(1)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="runs/kernel_compare")
    p.add_argument("--feature-net", default=None, help="a FeatureNet file (default: the yardstick of --data)")
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="digits, 20 steps, 64 eval images")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.steps, args.n_eval = "digits", 20, 64
    torch.set_num_threads(args.threads)
    train = load_dataset(args.data, split="train")
    test = load_dataset(args.data, split="test")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(test), generator=g)[: args.n_eval]
    real = to_model(torch.stack([test[int(i)][0] for i in idx]))
    net, net_note = yardstick(args.data, args.feature_net)
    feats = lambda x: features(net, from_model(x))
    real_f = feats(real)
    start = time.time()
    lines = [f"Stage-1 kernels on {args.data}: `tiny` preset, {args.steps} steps, batch {args.batch_size}, "
             f"seed {args.seed}, {args.threads} thread(s) on {platform.machine()} CPU; {len(idx)} held-out "
             f"images; Frechet distances in the features of {net_note}. "
             f"Command: `python benchmarks/kernel_compare.py {' '.join(argv or sys.argv[1:])}`", "",
             "| kernel | alpha | sharpness | MSE to source | Frechet distance (our classifier) |",
             "|---|---|---|---|---|", f"| real | - | {sharpness(from_model(real)):.4f} | - | - |"]
    for kernel in ("gaussian", "epanechnikov"):
        model = train_stage1(kernel, train, args.steps, args.batch_size, args.seed, Path(args.work_dir)).eval()
        for alpha in ALPHAS:
            with torch.inference_mode():
                kde = model.kde(real, alpha=alpha, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
            fd = f"{frechet_distance(feats(kde), real_f):.3f}"
            lines.append(f"| {kernel} | {alpha} | {sharpness(from_model(kde)):.4f} | "
                         f"{(kde - real).pow(2).mean().item() / 4:.5f} | {fd} |")
            print(lines[-1], flush=True)
    lines += ["", f"Wall time {time.time() - start:.0f} s."]
    if args.out:
        write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
