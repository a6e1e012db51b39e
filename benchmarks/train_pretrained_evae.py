"""Trains the shipped `fashion-mnist-evae` generator (EVAE, d_z 32) on all of Fashion-MNIST.

    python benchmarks/train_pretrained_evae.py --epochs 1 --out dkgm_aug/pretrained/fashion-mnist-evae.safetensors

``--data`` takes anything ``dkgm-aug train --data`` takes (e.g. the long-tailed split that
``benchmarks/imbalanced.py --export-split`` writes).

The command, data, epochs, wall time and hardware are stored in the checkpoint
(``dkgm-aug info fashion-mnist-evae``).
"""
import argparse
import platform
import sys
import time

import torch

from dkgm_aug.data import load_dataset
from dkgm_aug.vae import EVAE, fit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--d-z", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="dkgm_aug/pretrained/fashion-mnist-evae.safetensors")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = load_dataset(args.data, split="train")
    model = EVAE(channels=train.images.shape[1], image_size=train.images.shape[-1], d_z=args.d_z)
    start = time.time()
    fit(model, train.images, epochs=args.epochs, seed=args.seed, progress=True)
    wall = time.time() - start
    model.info["training"].update(
        command="python benchmarks/train_pretrained_evae.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        data=train.description, wall_time_s=round(wall, 1),
        hardware=f"CPU {platform.machine()}, {args.threads} thread(s)", torch_version=torch.__version__)
    model.save(args.out, classes=list(train.classes))
    print(f"wrote {args.out} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
