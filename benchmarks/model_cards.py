"""Model cards for the shipped generators: training record, sharpness of real / stage-1 /
stage-2 images on held-out data, and a sample grid.

    python benchmarks/model_cards.py --out docs/pretrained [--n 500] [--quick]
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

import dkgm_aug
from dkgm_aug.data import load_dataset
from dkgm_aug.images import from_model, to_model
from dkgm_aug.metrics import sharpness

# which held-out data each shipped generator is evaluated on
HELD_OUT = {"fashion-mnist-tiny": ("fashion-mnist", "test"), "digits-tiny": ("digits", "test")}


def preset_of(model) -> str:
    """The U-Net preset whose stage-1 config the model's matches ('custom' if none)."""
    from dkgm_aug.unet import PRESETS, preset_config
    cfg = model.stage1.config if hasattr(model.stage1, "config") else None
    for name in PRESETS:
        ref = preset_config(name, model.channels, False, model.num_classes)
        if cfg is not None and all(getattr(cfg, k) == getattr(ref, k) for k in ("base_channels", "channel_mult",
                                                                               "num_res_blocks")):
            return name
    return "custom"
ALPHAS = (0.25, 0.5, 1.0)


def card(name: str, n: int, out: Path, seed: int = 0) -> str:
    model = dkgm_aug.load(name)
    data_name, split = HELD_OUT[name]
    ds = load_dataset(data_name, split=split)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n]
    n = len(idx)
    real = to_model(torch.stack([ds[int(i)][0] for i in idx]))
    rows = [f"| real | - | {sharpness(from_model(real)):.4f} | - |"]
    with torch.inference_mode():
        for alpha in sorted({*ALPHAS, model.alpha}):   # the default's row draws the grid
            kde, s2 = model.sample(real, alpha=alpha, generator=torch.Generator().manual_seed(seed),
                                   return_stages=True)
            rows.append(f"| stage 1 (KDE) | {alpha} | {sharpness(from_model(kde)):.4f} | "
                        f"{(kde - real).pow(2).mean().item() / 4:.4f} |")
            rows.append(f"| stage 1 + 2 | {alpha} | {sharpness(from_model(s2)):.4f} | "
                        f"{(s2 - real).pow(2).mean().item() / 4:.4f} |")
            if alpha == model.alpha:
                grid = torch.cat([real[:12], kde[:12], s2[:12]])
    save_image(from_model(grid), out / f"{name}.png", nrow=12, padding=1)
    tr = model.info.get("training", {})
    lines = [f"# `{name}`", "",
             f"DKGM generator, preset `{preset_of(model)}` ({sum(p.numel() for p in model.parameters()):,} parameters), "
             f"{model.image_size[0]}x{model.image_size[1]}, {model.channels} channel(s), default alpha "
             f"{model.alpha}, steps {model.steps}, kernel {model.kernel}, stage-2 blur b ~ U{list(model.b_range)}.",
             "", "## Training record (from the checkpoint's metadata)", "", "```",
             json.dumps(tr, indent=1), "```", "",
             f"Classes: {', '.join(model.info.get('classes', []))}", "",
             f"## Held-out quality ({n} images of {data_name} {split}, noise seed {seed})", "",
             "Sharpness: the paper's Laplacian variance on [0, 1] images (higher is sharper). "
             "MSE to source: mean squared difference in [0, 1] units between each image and its "
             "neighbour (how far the neighbour moved).", "",
             "| images | alpha | sharpness | MSE to source |", "|---|---|---|---|", *rows, "",
             f"![samples]({name}.png)", "",
             f"Rows of the grid: real held-out images, stage-1 KDE neighbours, stage 1 + 2 (alpha {model.alpha}).",
             "", f"Command: `python benchmarks/model_cards.py --out {out} --n {n}`", ""]
    text = "\n".join(lines)
    (out / f"{name}.md").write_text(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/pretrained")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--names", nargs="*", default=None)
    p.add_argument("--quick", action="store_true", help="digits only, 32 images")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.names or (["digits-tiny"] if args.quick else [n for n in HELD_OUT if n in dkgm_aug.list_pretrained()])
    for name in names:
        print(card(name, 32 if args.quick else args.n, out))


if __name__ == "__main__":
    sys.exit(main())
