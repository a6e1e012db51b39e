"""A training epoch with a neighbour bank against no augmentation, RandAugment and online DKGM,
side by side in one run (issue 15), and what the bank's k costs and buys.

    OMP_NUM_THREADS=1 python benchmarks/bank_speed.py --out benchmarks/results/bank_speed
    python benchmarks/bank_speed.py --quick --out /tmp/bank_speed      # the test's dry run

The classifier is the benchmark's (``imbalanced.py --model resnet10t --channels 32 64 128 256``:
timm resnet10t at half width, random init) on the first ``--n-images`` 28x28 Fashion-MNIST training
images, one shuffled DataLoader (batch 128, ``num_workers=0``) for every variant; forward, backward
and an Adam step per batch. Each round runs every variant once, in turn; the table gives the median
of ``--repeats`` rounds after one warm-up epoch each. The bank is built once (its time is reported
apart: the k table's row), in a file that ``BankAugment`` reads memory-mapped, as a DataLoader worker would.
Writes ``<out>.md`` and ``<out>.csv``.
"""
import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import cpu_name, race, rand_augment, ratio, write_lines

LIMIT = 1.3    # issue 15: the bank's epoch is at most this many times the plain one


def build_model():
    import timm
    return timm.create_model("resnet10t", num_classes=10, in_chans=1, pretrained=False, channels=(32, 64, 128, 256))


def epoch_runner(ds, device, seed: int = 0):
    """``run(item_tf, batch_tf)``: one training epoch of the classifier over ``ds``."""
    torch.manual_seed(seed)
    net = build_model().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))

    def run(item_tf, batch_tf):
        ds.transform = item_tf
        net.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if batch_tf is not None:
                x = batch_tf(x)
            loss = F.cross_entropy(net((x - 0.5) / 0.5), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ds.transform = None
    return run


def k_table(ds, generator, ks, device, epochs: int, p: float, folder: Path) -> list:
    """Per k: the one-time build into a file (seconds, MiB) and the diversity it buys."""
    from dkgm_aug import NeighbourBank
    rows = []
    for k in ks:
        start = time.perf_counter()
        bank = NeighbourBank(ds, generator, k=k, device=device, path=folder / f"bank{k}.safetensors")
        bank.build(progress=False)
        seconds = time.perf_counter() - start
        images = torch.stack([torch.stack([bank.neighbour(i, r) for r in range(k)]) for i in range(len(bank))]).float()
        spread = 0.0
        if k > 1:   # RMS pixel distance between two neighbours of one source, mean over pairs and sources
            d = (images[:, :, None] - images[:, None]).pow(2).mean((-3, -2, -1)).sqrt()
            spread = float(d.sum((1, 2)).mean() / (k * (k - 1)))
        distinct = k * (1 - (1 - p / k) ** epochs)   # expected distinct neighbours one image shows in `epochs`
        rows.append(dict(k=k, build_s=seconds, per_image_ms=1000 * seconds / (k * len(bank)),
                         mib=images.numel() / 2 ** 20, distinct=distinct, spread=spread))
        print(f"  k={k}: built in {seconds:.1f} s, {distinct:.1f} distinct neighbours in {epochs} epochs, "
              f"spread {spread:.1f}", flush=True)
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="fashion-mnist-tiny")
    p.add_argument("--n-images", type=int, default=1024, help="the training subset an epoch runs over")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="bank sizes of the k table")
    p.add_argument("--k", type=int, default=8, help="the bank of the epoch table")
    p.add_argument("--p", type=float, default=0.5, help="probability of replacing an image (DKGM and bank)")
    p.add_argument("--epochs", type=int, default=30, help="training length for the diversity column")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="64 images, k in (1, 2), one round")
    p.add_argument("--out", default="benchmarks/results/bank_speed")
    args = p.parse_args(argv)
    if args.quick:
        args.n_images, args.ks, args.k, args.repeats = 64, [1, 2], 2, 1
    torch.set_num_threads(args.threads)
    return report(args, argv)


def report(args, argv) -> int:
    from torchvision.transforms import v2

    from dkgm_aug import BankAugment, DKGMAugment, NeighbourBank
    from dkgm_aug.data import load_dataset
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ds = load_dataset("fashion-mnist", split="train").subset(range(args.n_images))
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        print("k table:", flush=True)
        ks = k_table(ds, args.generator, sorted(set(args.ks) | {args.k}), device, args.epochs, args.p, Path(tmp))
        build_s = next(r["build_s"] for r in ks if r["k"] == args.k)
        bank = NeighbourBank(ds, args.generator, k=args.k, path=Path(tmp) / f"bank{args.k}.safetensors")   # mmapped
        assert bank.built
        ra = v2.Compose([v2.ToDtype(torch.uint8, scale=True), rand_augment(), v2.ToDtype(torch.float32, scale=True)])
        variants = {"(a) no augmentation": (None, None),
                    "(b) RandAugment per item, in the dataset transform": (ra, None),
                    f"(c) DKGMAugment(p={args.p}) on the collated batch": (None, DKGMAugment(args.generator, p=args.p,
                                                                                             seed=1, device=device)),
                    f"(d) DKGMAugment(p={args.p}) per item, in the dataset transform (on the CPU)":
                        (DKGMAugment(args.generator, p=args.p, seed=0, device="cpu"), None),
                    f"(e) BankAugment(p={args.p}, k={args.k}) per item, in the dataset transform":
                        (BankAugment(bank, p=args.p, seed=0), None)}
        run = epoch_runner(ds, device)
        print("epochs:", flush=True)
        t = race({name: (lambda v=v: run(*v)) for name, v in variants.items()}, args.repeats, sync=sync)
    base, bank_name = t["(a) no augmentation"], list(t)[-1]
    within = t[bank_name] / base <= LIMIT
    write_report(args, argv, t, ks, build_s, bank_name, load, within)
    return 0


def write_report(args, argv, t, ks, build_s, bank_name, load, within) -> None:
    base = t["(a) no augmentation"]
    hardware = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                else f"{cpu_name()}, {args.threads} torch thread(s)")
    lines = [f"# Neighbour bank vs online augmentation: `python benchmarks/bank_speed.py {' '.join(argv)}`", "",
             f"{hardware}; {args.generator}; the first {args.n_images} Fashion-MNIST training images (28x28); "
             f"timm resnet10t, channels (32, 64, 128, 256), batch 128, num_workers=0; median of {args.repeats} "
             f"round(s) after a warm-up epoch each. Load average (1, 5, 15 min) at the start: "
             f"{', '.join(f'{v:.2f}' for v in load)}.", "",
             "## One training epoch", "",
             "| variant | seconds per epoch | slowdown vs (a) |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {ratio(v / base)} |" for k, v in t.items()]
    lines += ["", f"The bank (k={args.k}, {args.n_images} images, one file) took {build_s:.1f} s to build, once; "
              f"its epoch is {t[bank_name] / base:.2f}x the plain one: "
              f"{'within' if within else 'OVER'} the {LIMIT}x target.", "",
              "## What k costs and buys", "",
              f"Each bank built on {args.device} into a file, timed from start to written. Distinct: the "
              f"expected number of different neighbours one image shows in {args.epochs} epochs at p={args.p}, "
              f"k(1 - (1 - p/k)^E) (online DKGM: p E = "
              f"{args.p * args.epochs:.0f}, a fresh one each time, at the cost of row (c) or (d) every epoch). "
              "Spread: the RMS pixel distance (0-255) between two neighbours of one image, mean over pairs "
              "and images (0 when k = 1: the same neighbour every time).", "",
              "| k | build (s) | ms per neighbour | bank (MiB) | distinct in "
              f"{args.epochs} epochs | spread |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['build_s']:.1f} | {r['per_image_ms']:.2f} | {r['mib']:.1f} | {r['distinct']:.1f} | "
              f"{r['spread']:.1f} |" for r in ks]
    for line in lines:
        print(line)
    write_lines(Path(f"{args.out}.md"), lines)
    with open(f"{args.out}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "variant_or_k", "seconds", "vs_plain", "ms_per_neighbour", "mib", "distinct", "spread"])
        w.writerows(["epoch", k, f"{v:.4f}", f"{v / base:.3f}", "", "", "", ""] for k, v in t.items())
        w.writerow(["bank build", args.k, f"{build_s:.2f}", "", "", "", "", ""])
        w.writerows(["k", r["k"], f"{r['build_s']:.2f}", "", f"{r['per_image_ms']:.3f}", f"{r['mib']:.2f}",
                     f"{r['distinct']:.2f}", f"{r['spread']:.2f}"] for r in ks)


if __name__ == "__main__":
    raise SystemExit(main())
