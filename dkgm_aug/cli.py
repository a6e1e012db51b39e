"""The ``dkgm-aug`` command line: ``train``, ``sample`` and ``info``.

    dkgm-aug train --data fashion-mnist --preset tiny --stage1-steps 2000 --stage2-steps 1000 --out gen.safetensors
    dkgm-aug sample gen.safetensors --data fashion-mnist --n 16 --alpha 0.5 --out grid.png
    dkgm-aug info gen.safetensors

``train`` also runs on several processes: ``torchrun --nproc_per_node=8 -m dkgm_aug.cli train ...``
(docs/distributed.md).
"""
import argparse
import json
import platform
import shlex
import sys

import torch
import torch.distributed as dist

from .augment import model_device
from .checkpoint import load, read_metadata, resolve
from .data import load_dataset
from .demo import main as demo_main
from .dkgm import DKGM
from .errors import DKGMError
from .images import from_model, to_model
from .trainer import Trainer, init_distributed
from .unet import PRESETS


def hardware(device: torch.device, world_size: int = 1) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return name if world_size == 1 else f"{world_size} processes x {name}"


def cmd_train(args) -> None:
    """Under torchrun every process runs this; the trainer splits each batch over them."""
    owned = dist.is_available() and not dist.is_initialized()
    rank, world_size = init_distributed(args.device)
    try:
        _train(args, rank, world_size)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank: int, world_size: int) -> None:
    data = load_dataset(args.data, split=args.split)
    if args.limit:
        data = data.subset(torch.arange(min(args.limit, len(data))))
    x0, _ = data[0]
    torch.manual_seed(args.seed)           # initial weights too: a rerun of the command is the same run
    model = DKGM.from_preset(args.preset, image_size=tuple(x0.shape[-2:]), channels=x0.shape[0],
                             alpha=args.alpha, steps=args.steps, b_range=(args.b_min, args.b_max),
                             kernel=args.kernel, m=args.m)
    batch_sizes = {1: args.batch_size, 2: args.stage2_batch_size or args.batch_size}
    max_steps = {1: args.stage1_steps, 2: args.stage2_steps}
    elapsed = {}
    for stage in (1, 2):
        trainer = Trainer(model, data, out_dir=args.work_dir, batch_size=batch_sizes[stage],
                          max_steps=max_steps[stage], lr=args.lr, seed=args.seed, device=args.device,
                          save_every=args.save_every, num_workers=args.num_workers, progress=not args.quiet)
        trainer.fit(stage)
        elapsed[f"stage{stage}_s"] = round(trainer.elapsed.get(stage, 0.0), 1)   # summed over resumes
    if rank != 0:        # rank 0 holds the same weights and writes the checkpoint
        return
    model.save(args.out, training=dict(
        command="dkgm-aug " + " ".join(shlex.quote(str(a)) for a in args.argv),
        data=data.description, n_images=len(data), stage1_steps=args.stage1_steps,
        stage2_steps=args.stage2_steps, batch_size=batch_sizes, world_size=world_size, lr=args.lr, seed=args.seed,
        wall_time_s=round(sum(elapsed.values()), 1), hardware=hardware(trainer.device, world_size),
        torch_version=torch.__version__, **elapsed), classes=list(data.classes))
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{sum(elapsed.values()):.0f} s of training); samples and logs in {args.work_dir}/")


def cmd_sample(args) -> None:
    from torchvision.utils import save_image
    model = load(args.checkpoint, device=args.device)
    data = load_dataset(args.data, split=args.split)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data), generator=g)[: args.n]
    real = to_model(torch.stack([data[int(i)][0] for i in idx])).to(model_device(model))
    out = model.neighbours(real, k=args.k, alpha=args.alpha, steps=args.steps, generator=g)
    # one row per source image: the real image, then its k neighbours
    grid = torch.cat([real[:, None], out], dim=1).flatten(0, 1)
    save_image(from_model(grid).cpu(), args.out, nrow=args.k + 1, padding=1)
    print(f"wrote {args.out}: {args.n} real images (left column) and {args.k} neighbours each")


def cmd_info(args) -> None:
    path = resolve(args.checkpoint)
    meta = read_metadata(path)
    model = load(path)
    meta["parameters"] = {name: sum(p.numel() for p in child.parameters())
                          for name, child in model.named_children()}
    print(json.dumps(meta, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dkgm-aug", description="Train and sample DKGM generators.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train both stages and write a checkpoint")
    t.add_argument("--data", default="fashion-mnist", help="fashion-mnist, digits, a .npz or an image folder")
    t.add_argument("--split", default="train")
    t.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    t.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    t.add_argument("--out", default="gen.safetensors")
    t.add_argument("--work-dir", default="runs/dkgm", help="training state, logs and sample grids")
    t.add_argument("--stage1-steps", type=int, default=2000)
    t.add_argument("--stage2-steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=64, help="global batch, split over torchrun's processes")
    t.add_argument("--stage2-batch-size", type=int, default=0, help="stage-2 batch size (0 = --batch-size)")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--alpha", type=float, default=0.5, help="noise level: stored default for sampling")
    t.add_argument("--steps", type=int, default=4, help="stage-2 iterations n")
    t.add_argument("--b-min", type=float, default=0.5)
    t.add_argument("--b-max", type=float, default=1.0)
    t.add_argument("--kernel", default="gaussian", choices=["gaussian", "epanechnikov"])
    t.add_argument("--m", type=int, default=1, help="noisy copies per image in the stage-1 loss")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=500)
    t.add_argument("--num-workers", type=int, default=0)
    t.add_argument("--device", default=None)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("sample", help="write a grid of real images and their KDE neighbours")
    s.add_argument("checkpoint", help="a checkpoint path or a shipped generator name")
    s.add_argument("--data", default="fashion-mnist")
    s.add_argument("--split", default="test")
    s.add_argument("--n", type=int, default=8)
    s.add_argument("--k", type=int, default=4)
    s.add_argument("--alpha", type=float, default=None)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples.png")
    s.add_argument("--device", default=None)
    s.set_defaults(func=cmd_sample)
    d = sub.add_parser("demo", help="balance a long-tailed Fashion-MNIST split with a shipped generator",
                       add_help=False)
    d.add_argument("demo_args", nargs=argparse.REMAINDER)
    d.set_defaults(func=lambda a: demo_main(a.demo_args))
    i = sub.add_parser("info", help="print a checkpoint's config and metadata")
    i.add_argument("checkpoint")
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except DKGMError as exc:
        print(f"dkgm-aug: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
