"""The ``dkgm-aug`` command line: ``train``, ``sample``, ``calibrate``, ``info``, ``demo`` and ``precompute``.

    dkgm-aug train --data fashion-mnist --preset tiny --stage1-steps 2000 --stage2-steps 1000 --out gen.safetensors
    dkgm-aug train --kind evae --data fashion-mnist --d-z 64 --stage1-steps 3000 --out evae.safetensors
    dkgm-aug train --data fashion-mnist --conditional --out cond.safetensors   # class-conditional DKGM
    dkgm-aug sample gen.safetensors --n 16 --alpha 0.5 --out grid.png
    dkgm-aug calibrate gen.safetensors --out gen-calibrated.safetensors
    dkgm-aug info gen.safetensors
    dkgm-aug demo --rho 100 --out demo_out
    dkgm-aug precompute fashion-mnist-tiny --data fashion-mnist --rho 100 --out synth/

``train`` keeps its state in ``--work-dir`` (default ``runs/<name of --out>``) and resumes from
it when run again with the same settings; ``--no-resume`` starts over. ``sample`` takes its
images from the data the checkpoint was trained on unless ``--data`` says otherwise.
``train`` also runs on several processes: ``torchrun --nproc_per_node=8 -m dkgm_aug.cli train ...``
(docs/distributed.md); so does ``precompute``, which splits its shards over the processes (docs/scale.md).
"""
import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import __version__, demo, precompute
from ._validate import check_int
from .augment import model_device
from .checkpoint import describe, load, read_metadata, resolve
from .data import DATASETS, ImageDataset, load_dataset
from .dkgm import DKGM
from .errors import DataError, DKGMError
from .images import from_model, to_model, to_uint8
from .sampling import check_class_order
from .trainer import Trainer, init_distributed
from .unet import PRESETS
from .vae import EVAE, VAE

LUMA = torch.tensor([0.299, 0.587, 0.114])   # PIL's convert("L") weights, as image folders get


def hardware(device: torch.device, world_size: int = 1) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return name if world_size == 1 else f"{world_size} processes x {name}"


def convert_images(data: ImageDataset, size=None, channels: int | None = None) -> ImageDataset:
    """``data`` with its images resized to ``size`` (H, W; antialiased bicubic) and converted to
    ``channels`` (1 <-> 3: gray to RGB, or RGB to luma); ``data`` itself when nothing changes."""
    x = data.images
    if channels is not None and x.shape[1] != channels:
        if {x.shape[1], channels} != {1, 3}:
            raise DataError(f"cannot convert {x.shape[1]}-channel images to {channels} channels: --channels "
                            "converts between 1 (gray) and 3 (RGB)")
        x = x.expand(-1, 3, -1, -1) if channels == 3 else (x.float() * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x.float(), size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    if x is data.images:
        return data
    x = to_uint8((x / 255).clamp(0, 1)) if x.is_floating_point() else x.contiguous()   # resampling overshoots
    desc = f"{data.description}, as {x.shape[2]}x{x.shape[3]} with {x.shape[1]} channel(s)"
    return ImageDataset(x, data.targets, data.classes, data.transform, desc)


def load_data(spec: dict) -> ImageDataset:
    """The images a data spec names: ``data`` (a dataset name, .npz or image folder), ``split``,
    ``limit`` (the first N images; 0 = all), ``size`` and ``channels``. Checkpoints that ``train``
    writes keep theirs in ``info["training"]["data_spec"]``, so ``sample`` can load the same images."""
    name, size, channels = spec["data"], spec.get("size"), spec.get("channels")
    folder = name not in DATASETS and Path(name).is_dir()   # mixed image sizes need resizing as they load
    data = load_dataset(name, split=spec.get("split"), **(dict(size=size, channels=channels) if folder else {}))
    if spec.get("limit"):
        data = data.subset(torch.arange(min(spec["limit"], len(data))))
    return convert_images(data, size, channels)


def cmd_train(args) -> None:
    """Under torchrun every process runs this; the trainer splits each batch over them."""
    args.work_dir = args.work_dir or str(Path("runs") / Path(args.out).stem)
    owned = dist.is_available() and not dist.is_initialized()
    rank, world_size = init_distributed(args.device)
    try:
        _train(args, rank, world_size)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


DKGM_ONLY = ("--preset", "--steps", "--b-min", "--b-max", "--kernel", "--m", "--stage2-steps", "--stage2-batch-size")


def build_model(args, data: ImageDataset):
    """The untrained model of ``--kind`` for the images of ``data``."""
    x0, _ = data[0]
    size, channels = tuple(x0.shape[-2:]), x0.shape[0]
    if args.conditional_stages is not None and not args.conditional:
        raise DKGMError("--conditional-stages needs --conditional")
    if args.conditional and args.kind != "dkgm":
        raise DKGMError(f"--conditional trains a class-conditional DKGM; --kind {args.kind} has no labels")
    if args.kind == "dkgm":
        if any(a == "--d-z" or a.startswith("--d-z=") for a in getattr(args, "argv", ())):
            raise DKGMError("--d-z sets the latent dimension of an EVAE or VAE; a DKGM has none (it would be "
                            "ignored): drop it, or train --kind evae")
        labels = dict(num_classes=int(data.targets.max()) + 1,   # classes 0..max label of the training data
                      conditional_stages=tuple(args.conditional_stages or (1, 2))) if args.conditional else {}
        return DKGM.from_preset(args.preset, image_size=size, channels=channels,
                                alpha=0.5 if args.alpha is None else args.alpha, steps=args.steps,
                                b_range=(args.b_min, args.b_max), kernel=args.kernel, m=args.m, **labels)
    given = [f for f in DKGM_ONLY for a in getattr(args, "argv", ()) if a == f or a.startswith(f + "=")]
    if given:
        raise DKGMError(f"{', '.join(dict.fromkeys(given))} set(s) a DKGM knob; --kind {args.kind} has none (it "
                        "would be ignored): drop it, or train --kind dkgm")
    knobs = dict(M=len(data)) if args.kind == "evae" else {}   # the penalty's M: the number of training images
    return {"evae": EVAE, "vae": VAE}[args.kind](channels=channels, image_size=size, d_z=args.d_z,
                                                 alpha=1.0 if args.alpha is None else args.alpha, **knobs)


def _train(args, rank: int, world_size: int) -> None:
    name = args.data if args.data in DATASETS else str(Path(args.data).resolve())   # loadable from anywhere
    spec = dict(data=name, split=args.split, limit=check_int("--limit", args.limit, 0),
                size=list(args.size) if args.size else None, channels=args.channels)
    data = load_data(spec)
    torch.manual_seed(args.seed)           # initial weights too: a rerun of the command is the same run
    model = build_model(args, data)
    batch_sizes = {1: args.batch_size, 2: args.stage2_batch_size or args.batch_size}
    max_steps = {1: args.stage1_steps, 2: args.stage2_steps}
    elapsed = {}
    for stage in model.stages:
        trainer = Trainer(model, data, out_dir=args.work_dir, batch_size=batch_sizes[stage],
                          max_steps=max_steps[stage], lr=args.lr, seed=args.seed, device=args.device,
                          save_every=args.save_every, num_workers=args.num_workers, progress=not args.quiet,
                          resume=not args.no_resume)
        trainer.fit(stage)
        elapsed[f"stage{stage}_s"] = round(trainer.elapsed.get(stage, 0.0), 1)   # summed over resumes
    if rank != 0:        # rank 0 holds the same weights and writes the checkpoint
        return
    model.save(args.out, training=dict(
        command="dkgm-aug " + " ".join(shlex.quote(str(a)) for a in args.argv),
        data=data.description, data_spec=spec, n_images=len(data),
        **{f"stage{s}_steps": max_steps[s] for s in model.stages},
        batch_size={s: batch_sizes[s] for s in model.stages}, world_size=world_size, lr=args.lr, seed=args.seed,
        wall_time_s=round(sum(elapsed.values()), 1), hardware=hardware(trainer.device, world_size),
        torch_version=torch.__version__, **elapsed), classes=list(data.classes))
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{sum(elapsed.values()):.0f} s of training); samples and logs in {args.work_dir}/")


def trained_on_fashion_mnist(model) -> bool:
    """Whether a checkpoint without ``data_spec`` says it was trained on Fashion-MNIST (the CLI's
    checkpoints from before ``data_spec``, and the shipped ones, record it as ``training.data``).
    Its shape alone says nothing: a 28x28 gray generator saved from Python may have seen any data."""
    if (model.channels, tuple(model.image_size)) != (1, (28, 28)):
        return False
    return str(model.info.get("training", {}).get("data", "")).lower().startswith("fashion-mnist")


def sample_spec(args, model) -> dict:
    """The data ``sample`` takes its images from: ``--data`` (with the --size and --channels recorded
    at training, if any: a DKGM generates at any size, and other channels are refused downstream),
    else the data the checkpoint was trained on; ``--split`` overrides either's split."""
    trained = model.info.get("training", {}).get("data_spec")
    if args.data is not None:   # with the --size and --channels recorded at training, if any
        spec = dict(data=args.data, size=(trained or {}).get("size"), channels=(trained or {}).get("channels"))
    elif trained:
        spec = dict(trained)
    elif trained_on_fashion_mnist(model):   # checkpoints from before data_spec
        spec = dict(data="fashion-mnist", split="test")
    else:
        raise DKGMError(f"{args.checkpoint} does not record the data it was trained on: pass --data "
                        "(and --split if the data has splits)")
    if args.split is not None:
        spec["split"] = args.split
    return spec


def cmd_sample(args) -> None:
    from torchvision.utils import save_image
    model = load(args.checkpoint, device=args.device)
    data = load_data(sample_spec(args, model))
    n, k = check_int("--n", args.n, 1), check_int("--k", args.k, 1)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data), generator=g)[:n]
    real = to_model(torch.stack([data[int(i)][0] for i in idx])).to(model_device(model))
    uses_labels = getattr(model, "conditional", False) or getattr(model, "per_class", False)
    check_class_order(model, data)
    labels = dict(labels=[data[int(i)][1] for i in idx]) if uses_labels else {}
    out = model.neighbours(real, k=k, alpha=args.alpha, steps=args.steps, generator=g, **labels)
    # one row per source image: the real image, then its k neighbours
    grid = torch.cat([real[:, None], out], dim=1).flatten(0, 1)
    save_image(from_model(grid).cpu(), args.out, nrow=k + 1, padding=1)
    print(f"wrote {args.out}: {len(idx)} real images (left column) and {k} neighbours each")


def cmd_calibrate(args) -> None:
    from .calibrate import calibrate
    from .label_filter import list_evaluators, load_evaluator
    model = load(args.checkpoint)
    spec = sample_spec(argparse.Namespace(data=args.data, split=args.split, checkpoint=args.checkpoint), model)
    if args.split is None:   # calibrate on training images, never on test images
        spec["split"] = "train" if spec["data"] in DATASETS else None
    evaluator = args.evaluator or f"{spec['data']}-evaluator"
    if args.evaluator is None and evaluator not in list_evaluators():
        raise DKGMError(f"no shipped evaluator for {spec['data']!r} (shipped: {list_evaluators()}): pass --evaluator, "
                        "a FeatureNet file (benchmarks/train_evaluator.py writes one)")
    record = calibrate(model, load_data(spec), load_evaluator(evaluator), n=args.n, tolerance=args.tolerance,
                       seed=args.seed)
    given = Path(str(args.checkpoint))        # beside the checkpoint (a shipped name: here), so that
    out = args.out or (given.parent if given.is_file() else Path()) / f"{given.stem}-calibrated.safetensors"
    model.info["calibration"].update(data=spec, evaluator=evaluator)
    model.save(out)
    real = record["real"]
    print(f"real sources: sharpness {real['sharpness']:.4f}, label preservation {real['label_preservation']:.3f}")
    print("alpha steps sharpness label_preservation")
    for r in record["grid"]:
        mark = " <- chosen" if (r["alpha"], r["steps"]) == (record["alpha"], record["steps"]) else ""
        print(f"{r['alpha']:5g} {r['steps']:5d} {r['sharpness']:9.4f} {r['label_preservation']:18.3f}{mark}")
    if not record["labels_kept"]:
        print(f"warning: no setting keeps label preservation within {args.tolerance} of the real images'; "
              "took the one that keeps the most", file=sys.stderr)
    print(f"wrote {out} with alpha={record['alpha']:g}, steps={record['steps']} as its defaults")


def cmd_precompute(args) -> None:
    """Under torchrun every process runs this and writes its share of the shards. The data: ``--data``
    (with the --size and --channels recorded at training, if any), else the data it was trained on, as
    ``sample`` takes them (``--data`` used to default to Fashion-MNIST whatever the generator had seen)."""
    model = load(args.generator)
    if args.data is None and not model.info.get("training", {}).get("data_spec"):
        if not trained_on_fashion_mnist(model):
            raise DKGMError(f"{args.generator} does not record the data it was trained on: pass --data")
        args = argparse.Namespace(**{**vars(args), "data": "fashion-mnist"})   # checkpoints from before data_spec
    spec = sample_spec(args, model)
    if spec["data"] not in DATASETS:
        spec["data"] = str(Path(spec["data"]).resolve())   # the same data from anywhere
    if args.limit:
        spec["limit"] = check_int("--limit", args.limit, 0)
    precompute.run(args, load_data(spec), spec)


def cmd_info(args) -> None:
    path = resolve(args.checkpoint)
    what = describe(path)
    if what["format"] != "generator":    # a trainer state, FeatureNet, cache or shard file: what it is
        print(json.dumps(what, indent=2, default=str))
        return
    meta = read_metadata(path)
    model = load(path)
    meta["parameters"] = {name: sum(p.numel() for p in child.parameters())
                          for name, child in model.named_children()}
    print(json.dumps(meta, indent=2))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except for on/off flags and ``None`` (worked out at run time, as the help says)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.nargs == 0 else super()._get_help_string(action)


def image_size(text: str) -> tuple:
    """``--size``: ``28`` or ``32x28`` (height x width)."""
    sides = text.lower().split("x")
    if len(sides) > 2 or not all(s.isdigit() and 1 <= int(s) <= 8192 for s in sides):
        raise argparse.ArgumentTypeError(f"expected N or HxW with sides in [1, 8192], got {text!r}")
    return int(sides[0]), int(sides[-1])


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--kind", default="dkgm", choices=["dkgm", "evae", "vae"],
                   help="the generator: DKGM, or the Epanechnikov VAE or Gaussian VAE of dkgm_aug.vae "
                        "(one stage, trained for --stage1-steps)")
    t.add_argument("--data", default="fashion-mnist", help="fashion-mnist, digits, a .npz or an image folder")
    t.add_argument("--split", default=None,
                   help="fashion-mnist: train or test; digits: train, test or all (default: train); "
                        "a .npz or an image folder is one split")
    t.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    t.add_argument("--size", type=image_size, default=None, help="resize the images to N or HxW (default: as they are)")
    t.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="convert the images to gray (1) or RGB (3) (default: as they are)")
    t.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="DKGM: U-Net size of both stages")
    t.add_argument("--conditional", action="store_true",
                   help="DKGM: class-conditional (a label embedding in the U-Nets; classes 0..max label of the "
                        "data), beside the paper's unconditional model; generation then needs each image's class")
    t.add_argument("--conditional-stages", type=int, nargs="+", choices=[1, 2], default=None,
                   help="with --conditional: the stages that take the label (default: 1 2)")
    t.add_argument("--d-z", type=int, default=64, help="EVAE and VAE: latent dimension")
    t.add_argument("--out", default="gen.safetensors", help="the checkpoint to write")
    t.add_argument("--work-dir", default=None,
                   help="training state, logs and sample grids (default: runs/<name of --out without suffix>)")
    t.add_argument("--no-resume", action="store_true",
                   help="start over, discarding the training state in --work-dir (by default a rerun resumes "
                        "from it, and refuses when the settings differ)")
    t.add_argument("--stage1-steps", type=int, default=2000,
                   help="training steps of stage 1 (DKGM: the denoiser; EVAE, VAE: the only stage)")
    t.add_argument("--stage2-steps", type=int, default=1000, help="training steps of stage 2 (the debiaser)")
    t.add_argument("--batch-size", type=int, default=64, help="global batch, split over torchrun's processes")
    t.add_argument("--stage2-batch-size", type=int, default=0, help="stage-2 batch size (0 = --batch-size)")
    t.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    t.add_argument("--alpha", type=float, default=None,
                   help="noise level: stored default for sampling (default: 0.5 for DKGM, 1.0 for EVAE and VAE, "
                        "their posterior's own spread)")
    t.add_argument("--steps", type=int, default=4, help="stage-2 iterations n")
    t.add_argument("--b-min", type=float, default=0.5, help="smallest stage-2 training blur (pixels)")
    t.add_argument("--b-max", type=float, default=1.0, help="largest stage-2 training blur (pixels)")
    t.add_argument("--kernel", default="gaussian", choices=["gaussian", "epanechnikov"], help="noise kernel")
    t.add_argument("--m", type=int, default=1, help="noisy copies per image in the stage-1 loss")
    t.add_argument("--seed", type=int, default=0, help="initial weights, data order and noise")
    t.add_argument("--save-every", type=int, default=500, help="steps between saves of the training state")
    t.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    # no abbreviated options: the checks that refuse a knob another kind would ignore read argv
    p = argparse.ArgumentParser(prog="dkgm-aug", description="Train and sample DKGM generators.", allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", allow_abbrev=False, help="train a generator (DKGM: both stages) and write a checkpoint",
                       formatter_class=HelpFormatter)
    add_train_arguments(t)
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("sample", allow_abbrev=False, help="write a grid of real images and their KDE neighbours",
                       formatter_class=HelpFormatter)
    s.add_argument("checkpoint", help="a checkpoint path or a shipped generator name")
    s.add_argument("--data", default=None, help="the source images (default: the data the checkpoint was trained on)")
    s.add_argument("--split", default=None, help="the split of --data (default: as trained)")
    s.add_argument("--n", type=int, default=8, help="real images (rows)")
    s.add_argument("--k", type=int, default=4, help="neighbours per real image")
    s.add_argument("--alpha", type=float, default=None, help="noise level (default: the checkpoint's)")
    s.add_argument("--steps", type=int, default=None, help="stage-2 iterations (default: the checkpoint's)")
    s.add_argument("--seed", type=int, default=0, help="picks the images and draws the noise")
    s.add_argument("--out", default="samples.png", help="the PNG grid to write")
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    s.set_defaults(func=cmd_sample)
    d = sub.add_parser("demo", allow_abbrev=False, help="balance a long-tailed Fashion-MNIST split with a shipped generator",
                       description=demo.__doc__, formatter_class=HelpFormatter)
    demo.add_arguments(d)
    d.set_defaults(func=demo.run)
    c = sub.add_parser("calibrate", allow_abbrev=False, help="choose a generator's default alpha and stage-2 steps on training images",
                       formatter_class=HelpFormatter)
    c.add_argument("checkpoint", help="a checkpoint path or a shipped generator name")
    c.add_argument("--data", default=None, help="the images (default: the data the checkpoint was trained on)")
    c.add_argument("--split", default=None, help="the split of --data (default: train)")
    c.add_argument("--evaluator", default=None,
                   help="a shipped evaluator name or FeatureNet file (default: <data>-evaluator)")
    c.add_argument("--n", type=int, default=500, help="training images scored per setting")
    c.add_argument("--tolerance", type=float, default=0.03,
                   help="label preservation may fall this far below the evaluator's accuracy on the sources")
    c.add_argument("--seed", type=int, default=0, help="picks the images and draws the noise")
    c.add_argument("--out", default=None, help="the calibrated checkpoint (default: <name>-calibrated.safetensors beside the checkpoint; a shipped name: here)")
    c.set_defaults(func=cmd_calibrate)
    r = sub.add_parser("precompute", allow_abbrev=False, help="write the synthetic set of a BalancedDKGMDataset, or a neighbour bank, "
                       "as shards (torchrun splits them over processes)", description=precompute.__doc__,
                       formatter_class=HelpFormatter)
    precompute.add_arguments(r)
    r.set_defaults(func=cmd_precompute)
    i = sub.add_parser("info", allow_abbrev=False, help="print a checkpoint's config and metadata (other dkgm_aug files: what they are)",
                       formatter_class=HelpFormatter)
    i.add_argument("checkpoint", help="a checkpoint path or a shipped generator name")
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
