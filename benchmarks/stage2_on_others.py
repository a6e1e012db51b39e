"""Stage 2 of DKGM on other stage-1 models (the DKGM paper's Table 3, on Fashion-MNIST).

    python benchmarks/stage2_on_others.py --out benchmarks/results/stage2_on_others.md [--quick]

Each stage-1 model makes one neighbour of every held-out test image: DKGM's own KDE
stage (``fashion-mnist-tiny``), a Gaussian VAE and an EVAE (d_z 64, trained here), and
the training-free kernel-smoothed-score sampler (per class). The shipped
``fashion-mnist-tiny`` stage-2 debiaser (trained on blurred images with b ~ U[0.5, 1],
as in the paper's Table 3) then runs on those outputs. Reported before/after: the
paper's sharpness and the Frechet distance to the real held-out images in the feature
space of the Fashion-MNIST yardstick classifier (``common.yardstick``; not Inception
features: not comparable with FID).
"""
import argparse
import platform
import sys
import time

import torch

import dkgm_aug
from dkgm_aug.data import fashion_mnist
from dkgm_aug.features import features
from dkgm_aug.images import from_model, to_model
from dkgm_aug.kss import KernelSmoothedScore
from dkgm_aug.metrics import frechet_distance, sharpness
from dkgm_aug.vae import EVAE, VAE, fit
from common import write_lines, yardstick


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="fashion-mnist-tiny", help="whose stage 2 debiases")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--train-size", type=int, default=20000, help="VAE/EVAE training images")
    p.add_argument("--vae-epochs", type=int, default=2)
    p.add_argument("--kss-per-class", type=int, default=1000)
    p.add_argument("--feature-net", default=None, help="a FeatureNet file (default: the Fashion-MNIST yardstick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    args = p.parse_args(argv)
    if args.quick:
        args.n_test, args.train_size, args.vae_epochs, args.kss_per_class = 64, 512, 1, 50
    torch.set_num_threads(args.threads)
    start = time.time()
    train, test = fashion_mnist(split="train"), fashion_mnist(split="test")
    g = torch.Generator().manual_seed(args.seed)
    test_idx = torch.randperm(len(test), generator=g)[: args.n_test]
    real = to_model(test.images[test_idx].float() / 255)
    labels = test.targets[test_idx].tolist()

    net, net_note = yardstick("fashion-mnist", args.feature_net)
    real_f = features(net, from_model(real))

    dkgm = dkgm_aug.load(args.generator)
    sub = train.images[torch.randperm(len(train), generator=g)[: args.train_size]]
    stage1 = {"DKGM stage 1 (KDE)": dkgm}
    for cls in (VAE, EVAE):
        torch.manual_seed(args.seed)
        model = cls(channels=1, image_size=28, d_z=64)
        fit(model, sub, epochs=args.vae_epochs, seed=args.seed, progress=False)
        stage1[f"{cls.__name__} (d_z 64, {args.vae_epochs} epochs on {len(sub)} images)"] = model.eval()
    keep = torch.cat([torch.nonzero(train.targets == c).flatten()[: args.kss_per_class] for c in range(10)])
    stage1[f"kernel-smoothed score (per class, {args.kss_per_class}/class)"] = KernelSmoothedScore(
        train.images[keep], train.targets[keep].tolist())

    seeds = list(range(len(real)))
    lines = [f"Stage 2 of `{args.generator}` on other stage-1 models, Fashion-MNIST, {len(real)} held-out test "
             f"images, seed {args.seed}, {args.threads} thread(s) on {platform.machine()} CPU, torch "
             f"{torch.__version__}. Command: `python benchmarks/stage2_on_others.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Real held-out images: sharpness {sharpness(from_model(real)):.4f}. Frechet distances in the "
             f"features of {net_note}.", "",
             "| stage-1 model | sharpness S1 | sharpness S1+S2 | Frechet distance S1 | Frechet distance S1+S2 |",
             "|---|---|---|---|---|"]
    for name, model in stage1.items():
        with torch.inference_mode():
            if model is dkgm:             # its own stage 1 alone: neighbours_from_seeds would also debias
                s1 = torch.cat([dkgm.kde(real[i:i + 250], alpha=0.5,
                                         generator=torch.Generator().manual_seed(args.seed + i)).clamp(-1, 1)
                                for i in range(0, len(real), 250)])
            else:
                s1 = torch.cat([model.neighbours_from_seeds(real[i:i + 250], seeds[i:i + 250],
                                                            labels=labels[i:i + 250], alpha=0.5)
                                for i in range(0, len(real), 250)])
            s2 = torch.cat([dkgm.debias(s1[i:i + 250]).clamp(-1, 1) for i in range(0, len(s1), 250)])
        row = [sharpness(from_model(s1)), sharpness(from_model(s2)),
               frechet_distance(features(net, from_model(s1)), real_f),
               frechet_distance(features(net, from_model(s2)), real_f)]
        lines.append(f"| {name} | {row[0]:.4f} | {row[1]:.4f} | {row[2]:.2f} | {row[3]:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", f"Wall time {time.time() - start:.0f} s (VAE/EVAE training included)."]
    if args.out:
        write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
