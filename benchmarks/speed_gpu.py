"""Generation speed on a GPU: the GPU rows of section 3 of benchmarks/RESULTS.md.

    python benchmarks/speed_gpu.py --generator fashion-mnist-tiny --out benchmarks/results/speed_gpu.md [--quick]

Measured side by side in one run with the timing helpers of ``speed.py``, in ``common.py`` (median
of a few timed calls after a warm-up, variants taking turns, ``torch.cuda.synchronize`` after each call):

1. ``DKGMAugment`` per image and on batches of 64 to 16,384 uint8 images on the GPU, next to
   torchvision's ``RandAugment`` on the same batch, and the share of the time spent drawing
   each image's seeded noise (Philox counters in torch ops, on the device).
2. Precision and compilation: fp32 (the default), fp16/bf16 autocast, fp16/bf16 weights
   (``model.half()``: the library path follows the model's dtype), channels-last and
   ``torch.compile`` (default and ``mode="reduce-overhead"``, i.e. CUDA graphs), with the
   largest pixel difference from fp32 that each one makes.
3. DKGM against a DDPM-style sampler calling the same stage-2 U-Net 50 and 1000 times.
4. Cost vs image size (random ``tiny`` U-Nets from 28x28 to 256x256).
5. One training epoch of a timm classifier on the GPU with and without DKGM on the batch.

``--device cpu`` runs the same code on the CPU (a dry run: the test suite uses it with
``--quick``); the numbers are then CPU numbers and say so.
"""
import argparse
import copy
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from dkgm_aug import DKGM, DKGMAugment, augment, load
from dkgm_aug.kernels import noise_from_seeds
from common import (cpu_name, ddpm_sample, fmt, generation, inference_autocast, plot, race, rand_augment, ratio,
                    slowdown_table, unet_calls)


def pixel_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    """Largest and mean absolute difference of two [-1, 1] outputs, in 1/255 steps of [0, 1] pixels."""
    d = (a.float() - b.float()).abs() * 255 / 2
    return f"{d.max().item():.2f} / {d.mean().item():.3f}"


def section_batches(gen_name, model, batches, reps, dev, sync):
    c, (h, w) = model.channels, model.image_size
    aug = DKGMAugment(gen_name, seed=0, device=dev)
    half = DKGMAugment(copy.deepcopy(model).half(), seed=0, device=dev)
    ra = rand_augment()
    single = torch.randint(0, 256, (c, h, w), dtype=torch.uint8, device=dev)
    k = 20
    t = race({"one": lambda: [aug(single) for _ in range(k)]}, reps, sync)["one"]
    lines = ["### Throughput vs batch size on the GPU", "",
             f"{h}x{w} uint8 images already on the device, `{gen_name}` ({unet_calls(model)} U-Net calls per image). "
             "`noise share` = time to draw each image's seeded noise on the device "
             "(Philox counters in torch ops; part of every DKGM call: it makes an image's neighbour independent of its batch), "
             "over the fp32 call's time.", "",
             "| input | batch | DKGMAugment fp32 images/s | DKGMAugment fp16 weights images/s | noise share (fp32) | "
             "RandAugment images/s | DKGM fp32 / RandAugment |", "|---|---|---|---|---|---|---|",
             f"| per image (CHW) | 1 | {fmt(k / t)} | - | - | - | - |"]
    print("  " + lines[-1], flush=True)
    rows = []
    for bs in batches:
        batch = torch.randint(0, 256, (bs, c, h, w), dtype=torch.uint8, device=dev)
        seeds = list(range(bs))
        draw = lambda: noise_from_seeds(seeds, (c, h, w), model.kernel, dev)  # noqa: E731  the library's draw
        t = race({"fp32": lambda: aug(batch), "fp16": lambda: half(batch), "noise": draw,
                  "ra": lambda: ra(batch)}, reps, sync)
        rows.append((bs, bs / t["fp32"], bs / t["fp16"]))
        lines.append(f"| batched (BCHW) | {bs} | {fmt(bs / t['fp32'])} | {fmt(bs / t['fp16'])} | "
                     f"{t['noise'] / t['fp32']:.0%} | {fmt(bs / t['ra'])} | {ratio(t['ra'] / t['fp32'])} |")
        print("  " + lines[-1], flush=True)
    bs = batches[-1]
    cpu_batch = torch.randint(0, 256, (bs, c, h, w), dtype=torch.uint8)
    t = race({"a": lambda: aug(cpu_batch)}, reps, sync)["a"]
    lines.append(f"| batched, uint8 on the CPU (copied to the GPU and back) | {bs} | {fmt(bs / t)} | - | - | - | - |")
    print("  " + lines[-1], flush=True)
    return lines, rows


class Cloned(torch.nn.Module):
    """A compiled U-Net whose output is copied at once: CUDA-graph outputs are overwritten by
    the graph's next run, and stage 2 reads stage 1's output across several runs."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *args):
        return self.net(*args).clone()


def section_precision(model, batches, reps, dev, sync, compile_modes, compile_batch):
    c, (h, w) = model.channels, model.image_size
    half, bf16 = copy.deepcopy(model).half(), copy.deepcopy(model).bfloat16()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    compiled = {}
    torch._dynamo.config.cache_size_limit = 64      # stage 2 is specialised on each time step t
    for mode in compile_modes:
        m = copy.deepcopy(model)
        m.stage1, m.stage2 = (Cloned(torch.compile(m.stage1, mode=mode)), Cloned(torch.compile(m.stage2, mode=mode)))
        compiled[mode] = m
    lines = ["### Precision, memory format and compilation on the GPU", "",
             "Stage 1 + stage 2 with given noise (the noise draw left out). Pixel difference = "
             "largest / mean absolute difference from the fp32 output, in 1/255 steps of a [0, 1] "
             "pixel (under 0.5 rounds to the same uint8 image). TF32: "
             f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
             f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32} (the PyTorch defaults).", "",
             "| variant | batch | images/s | speed-up over fp32 | pixel difference (max / mean) | first call s |",
             "|---|---|---|---|---|---|"]
    for bs in batches:
        g = torch.Generator(dev).manual_seed(0)
        x = torch.rand(bs, c, h, w, device=dev, generator=g) * 2 - 1
        eps = torch.randn(bs, c, h, w, device=dev, generator=g)
        cx, ce = (v.contiguous(memory_format=torch.channels_last) for v in (x, eps))
        variants = {"fp32 (library default)": generation(model, x, eps),
                    "fp16 autocast": generation(model, x, eps, lambda: inference_autocast(dev.type, torch.float16)),
                    "bf16 autocast": generation(model, x, eps, lambda: inference_autocast(dev.type, torch.bfloat16)),
                    "fp16 weights (`model.half()`)": generation(half, x.half(), eps.half()),
                    "bf16 weights (`model.bfloat16()`)": generation(bf16, x.bfloat16(), eps.bfloat16()),
                    "channels_last": generation(cl, cx, ce)}
        ref = variants["fp32 (library default)"]()
        diffs = {k: pixel_diff(fn(), ref) for k, fn in variants.items()}
        first = {}
        for mode, m in (compiled.items() if bs == compile_batch else ()):
            name = f"torch.compile(mode={mode!r})"
            try:
                t0 = time.perf_counter()
                generation(m, x, eps)()
                sync()
                first[name] = f"{time.perf_counter() - t0:.1f}"
                diffs[name] = pixel_diff(generation(m, x, eps)(), ref)
                variants[name] = generation(m, x, eps)
            except Exception as e:      # report, do not die: compile support varies by install
                traceback.print_exc()
                lines.append(f"| {name} | {bs} | failed: {type(e).__name__}: {str(e)[:100]} | - | - | - |")
        t = race(variants, reps, sync)
        base = t["fp32 (library default)"]
        for k, v in t.items():
            lines.append(f"| {k} | {bs} | {fmt(bs / v)} | {ratio(base / v)} | {diffs[k]} | {first.get(k, '-')} |")
            print("  " + lines[-1], flush=True)
    return lines


def section_ddpm(gen_name, model, steps_list, bs, reps, dev, sync):
    c, (h, w) = model.channels, model.image_size
    aug = DKGMAugment(gen_name, seed=0, device=dev)
    batch = torch.randint(0, 256, (bs, c, h, w), dtype=torch.uint8, device=dev)
    g = torch.Generator(dev).manual_seed(0)
    lines = ["### DKGM vs a DDPM-style sampler on the GPU", "",
             f"Same stage-2 U-Net as `speed.py`'s CPU table (its weights are not a diffusion model: "
             f"only the cost counts), batch {bs}, every step run.", "",
             "| sampler | U-Net calls per image | images/s | time per image vs DKGM |", "|---|---|---|---|"]
    t_dkgm = race({"d": lambda: aug(batch)}, reps, sync)["d"]
    lines.append(f"| DKGM (library, fp32) | {unet_calls(model)} | {fmt(bs / t_dkgm)} | x1 |")
    for steps in steps_list:
        t = race({"p": lambda: ddpm_sample(model.stage2, (bs, c, h, w), steps, g)}, 1 if steps > 100 else reps, sync)["p"]
        lines.append(f"| DDPM-style, {steps} steps | {steps} | {fmt(bs / t)} | {ratio(t / t_dkgm)} |")
        print("  " + lines[-1], flush=True)
    return lines


def section_sizes(sizes, bs, reps, dev, sync):
    lines = ["### Cost vs image size on the GPU", "",
             f"`DKGM.from_preset('tiny', image_size=s)` with random weights, batch {bs}, the library path "
             "`augment.generate` (noise draw included), fp32 and with fp16 weights.", "",
             "| image size | fp32 images/s | fp32 ns per pixel | fp16 weights images/s | fp16 speed-up |",
             "|---|---|---|---|---|"]
    rows = []
    for s in sizes:
        torch.manual_seed(0)
        m = DKGM.from_preset("tiny", image_size=s).eval().to(dev)
        mh = copy.deepcopy(m).half()
        x, seeds = torch.rand(bs, 1, s, s, device=dev), list(range(bs))
        try:
            t = race({"f": lambda: augment.generate(m, x, seeds), "h": lambda: augment.generate(mh, x, seeds)},
                     reps, sync)
        except torch.OutOfMemoryError as e:     # a row that says so; the smaller sizes stand
            lines.append(f"| {s}x{s} | out of memory: {str(e)[:90]} | - | - | - |")
        else:
            rows.append((s, bs / t["f"], bs / t["h"]))
            lines.append(f"| {s}x{s} | {fmt(bs / t['f'])} | {1e9 * t['f'] / bs / (s * s):.3g} | {fmt(bs / t['h'])} | "
                         f"{ratio(t['f'] / t['h'])} |")
        print("  " + lines[-1], flush=True)
        m = mh = x = None       # free this size before the next
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return lines, rows


def section_epoch(gen_name, model, n_images, bs, reps, dev, sync):
    import timm
    c, (h, w) = model.channels, model.image_size
    g = torch.Generator(dev).manual_seed(0)
    data = torch.randint(0, 256, (n_images, c, h, w), dtype=torch.uint8, device=dev, generator=g)
    labels = torch.randint(0, 10, (n_images,), device=dev, generator=g)
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", num_classes=10, in_chans=c, pretrained=False).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    ra = rand_augment()
    variants = {"(a) no augmentation": None,
                "(b) DKGMAugment(p=0.5) on the batch, fp32": DKGMAugment(gen_name, p=0.5, seed=0, device=dev),
                "(c) DKGMAugment(p=0.5) on the batch, fp16 weights":
                    DKGMAugment(copy.deepcopy(model).half(), p=0.5, seed=0, device=dev),
                "(d) RandAugment on the batch": ra}

    def epoch(tf, max_batches=None):
        def run():
            net.train()
            for i in range(0, n_images, bs):
                if max_batches is not None and i // bs == max_batches:
                    break
                x = data[i:i + bs]
                x = (tf(x) if tf is not None else x).float() / 255
                loss = torch.nn.functional.cross_entropy(net(x), labels[i:i + bs])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return run
    for tf in variants.values():
        epoch(tf, 1)()
    t = race({k: epoch(v) for k, v in variants.items()}, reps, sync, warmup=False)
    return ["### One training epoch on the GPU with and without augmentation", "",
            f"`timm` resnet10t (random init, fp32), forward + backward + Adam over {n_images} random uint8 "
            f"{h}x{w} images already on the GPU (the cost does not depend on their content), batch {bs}; "
            f"median of {reps} epochs.", ""] + slowdown_table(t, 3)


def plot_report(md: Path) -> Path:
    """``md``'s PNG (beside it): fp32 and fp16-weight images/s vs batch size and vs image side,
    read back from the report's own tables (``--plot-only`` redraws it from a saved report)."""
    def number(cell):
        return float(cell.replace(",", ""))
    batch_rows, size_rows = [], []
    for line in md.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "batched (BCHW)":
            batch_rows.append((int(cells[1]), number(cells[2]), number(cells[3])))
        elif len(cells) == 5 and "x" in cells[0] and cells[0].split("x")[0].isdigit() and cells[1][:1].isdigit():
            size_rows.append((int(cells[0].split("x")[0]), number(cells[1]), number(cells[3])))
    first = md.read_text().splitlines()[0]
    png = md.with_suffix(".png")
    plot(png, batch_rows, size_rows, first.split("`")[1], first.split(" on ")[1].split(";")[0],
         labels=("DKGM fp32", "DKGM fp16 weights"))
    return png


SECTIONS = ("batches", "DDPM-style", "image size", "epoch", "precision")


def run_part(name, fn):
    """One section; a failure becomes a line in the report instead of losing the others."""
    print(f"{name}:", flush=True)
    try:
        return fn()
    except Exception as e:
        traceback.print_exc()
        return [f"### {name}", "", f"failed: {type(e).__name__}: {str(e)[:300]}"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="fashion-mnist-tiny")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384])
    p.add_argument("--precision-batches", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--compile-modes", nargs="*", default=["default", "reduce-overhead"])
    p.add_argument("--compile-batch", type=int, default=1024, help="the precision batch that compile is timed at")
    p.add_argument("--ddpm-steps", type=int, nargs="+", default=[50, 1000])
    p.add_argument("--ddpm-batch", type=int, default=1024)
    p.add_argument("--image-sizes", type=int, nargs="+", default=[28, 64, 128, 256])
    p.add_argument("--size-batch", type=int, default=64)
    p.add_argument("--epoch-images", type=int, default=16384)
    p.add_argument("--epoch-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="tiny batches, no compile (a dry run, e.g. --device cpu)")
    p.add_argument("--plot-only", metavar="MD", help="redraw the PNG of a saved report and exit")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="which tables to run")
    args = p.parse_args(argv)
    if args.plot_only:
        print(f"wrote {plot_report(Path(args.plot_only))}")
        return 0
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("no GPU here (torch.cuda.is_available() is False); --device cpu runs a dry run")
    if args.quick:
        args.batch_sizes, args.precision_batches, args.compile_modes = [2, 4], [4], []
        args.ddpm_steps, args.ddpm_batch, args.image_sizes, args.size_batch = [5], 2, [8, 16], 2
        args.epoch_images, args.epoch_batch, args.repeats = 16, 8, 1
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t_start = time.perf_counter()
    model = load(args.generator, device=dev).eval()
    h, w = model.image_size
    where = (f"{torch.cuda.get_device_name(dev)}, CUDA {torch.version.cuda}" if dev.type == "cuda"
             else f"CPU ({cpu_name()}), a dry run: these are not GPU numbers")
    head = [f"Generator `{args.generator}` ({h}x{w}, steps {model.steps}) on {where}; torch {torch.__version__}, "
            f"Python {platform.python_version()}, host {cpu_name()}.", "",
            f"Command: `python benchmarks/speed_gpu.py {' '.join(argv)}`"]
    sections = {   # the slow, compiling section last: the report is rewritten after each one
        "batches": lambda: section_batches(args.generator, model, args.batch_sizes, args.repeats, dev, sync)[0],
        "DDPM-style": lambda: section_ddpm(args.generator, model, args.ddpm_steps, args.ddpm_batch, args.repeats,
                                           dev, sync),
        "image size": lambda: section_sizes(args.image_sizes, args.size_batch, args.repeats, dev, sync)[0],
        "epoch": lambda: section_epoch(args.generator, model, args.epoch_images, args.epoch_batch, args.repeats,
                                       dev, sync),
        "precision": lambda: section_precision(model, args.precision_batches, args.repeats, dev, sync,
                                               args.compile_modes, args.compile_batch)}
    lines = []
    for name, fn in ((k, v) for k, v in sections.items() if k in args.sections):
        lines += run_part(name, fn) + [""]
        text = "\n".join([head[0] + f" Run time so far {time.perf_counter() - t_start:.0f} s.", *head[1:], "",
                          *lines])
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
    if args.out:
        plot_report(Path(args.out))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
