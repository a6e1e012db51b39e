"""Generation speed of the augmentation API against its alternatives, and the memory of wrapping a large dataset.

    python benchmarks/speed.py --generator fashion-mnist-tiny --threads 1 --out benchmarks/results/speed_cpu1.md [--quick]

Measured side by side in one run; every number is the median of a few timed calls after
one warm-up call, and the variants of one comparison take turns (round robin) so that a
change in machine load hits them alike:

1. ``DKGMAugment`` one image at a time (what a CPU DataLoader worker does) and on collated
   batches, next to torchvision's ``RandAugment`` on the same uint8 images.
2. What DKGM avoids: a DDPM-style ancestral sampler that calls the same stage-2 U-Net 50
   and 1000 times (its weights are not a trained diffusion model: only the cost counts).
3. One training epoch of a small timm classifier through the same DataLoader without
   augmentation, with DKGM per item, with DKGM on the collated batch, and with RandAugment.
4. How the cost grows with batch size and image size (a PNG plot next to ``--out``).
5. Speed-ups tried on CPU (inference_mode, channels-last, bf16 autocast, cache-sized
   chunks, torch.compile); the GPU's are in ``speed_gpu.py``.
6. The resident memory added by wrapping a 1,000,000-item dataset in
   ``BalancedDKGMDataset`` (labels only: no image is loaded).
"""
import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torchvision.transforms import v2

from dkgm_aug import DKGM, BalancedDKGMDataset, DKGMAugment, augment, load
from dkgm_aug.errors import DataError
from dkgm_aug.sampling import CLASS_CHECKS, SPOT_CHECKS
from common import (cpu_name, ddpm_sample, fmt, generation, inference_autocast, plot, race, rand_augment, ratio,
                    slowdown_table, unet_calls)

# -- timing ----------------------------------------------------------------------------------


def repeated(fn, k: int):
    """``fn`` called ``k`` times: one timed call long enough for the clock."""
    def run():
        for _ in range(k):
            fn()
    return run


# -- sections ------------------------------------------------------------------------------------


def section_throughput(gen_name, model, batch_sizes, reps, quick):
    """Images/s of DKGMAugment and RandAugment per image and per batch; rows for the plot."""
    c, (h, w) = model.channels, model.image_size
    aug, ra = DKGMAugment(gen_name, seed=0), rand_augment()
    single = torch.randint(0, 256, (c, h, w), dtype=torch.uint8)
    k_dkgm, k_ra = (2, 50) if quick else (8, 400)
    t = race({"dkgm": repeated(lambda: aug(single), k_dkgm), "ra": repeated(lambda: ra(single), k_ra)}, reps)
    per_image = (k_dkgm / t["dkgm"], k_ra / t["ra"])
    rows = []
    for bs in batch_sizes:
        batch = torch.randint(0, 256, (bs, c, h, w), dtype=torch.uint8)
        k = max(1, 16 // bs) if not quick else 1
        t = race({"dkgm": repeated(lambda: aug(batch), k), "ra": repeated(lambda: ra(batch), 20 * k)},
                 reps if bs < 256 else max(2, reps // 2))
        rows.append((bs, bs * k / t["dkgm"], 20 * bs * k / t["ra"]))
        print(f"  batch {bs}: DKGM {rows[-1][1]:.1f} img/s, RandAugment {rows[-1][2]:.0f} img/s", flush=True)
    existing = ["| path | batch | synthetic images/s |", "|---|---|---|",
                f"| DKGMAugment per image (uint8 CHW) | 1 | {per_image[0]:.1f} |"]
    existing += [f"| DKGMAugment batched (uint8 BCHW) | {bs} | {d:.1f} |" for bs, d, _ in rows]
    table = ["### DKGMAugment vs torchvision RandAugment, and cost vs batch size", "",
             f"{h}x{w} uint8 images, `{gen_name}` with its default alpha and steps "
             f"({unet_calls(model)} U-Net calls per image), `v2.RandAugment()` defaults "
             "(on a batch it draws one op for the whole batch). Per image = CHW input, one call per image.", "",
             "| input | batch | DKGMAugment images/s | RandAugment images/s | DKGM / RandAugment |",
             "|---|---|---|---|---|",
             f"| per image (CHW) | 1 | {fmt(per_image[0])} | {fmt(per_image[1])} | {ratio(per_image[0] / per_image[1])} |"]
    table += [f"| batched (BCHW) | {bs} | {fmt(d)} | {fmt(r)} | {ratio(d / r)} |" for bs, d, r in rows]
    return existing, table, per_image, rows


def section_ddpm(model, gen_name, steps_list, batches, reps, quick):
    c, (h, w) = model.channels, model.image_size
    aug = DKGMAugment(gen_name, seed=0)
    lines = ["### DKGM vs a DDPM-style sampler on the same stage-2 U-Net", "",
             f"The DDPM-style sampler calls `{gen_name}`'s stage-2 U-Net `stage2(x, t)` once per step "
             "(ancestral update, linear betas respaced from 1000 steps). Those weights were not "
             "trained as a diffusion model: the images are meaningless, only the cost is measured. "
             f"DKGM makes a neighbour with {unet_calls(model)} U-Net calls (stage 1, then stage 2 "
             f"at t = 0..{model.steps}). Both are timed side by side at the same batch size; every "
             "step is run (nothing extrapolated).", "",
             "| sampler | U-Net calls per image | batch | timed runs | images/s | time per image vs DKGM |",
             "|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for steps, bs in zip(steps_list, batches):
        batch = torch.randint(0, 256, (bs, c, h, w), dtype=torch.uint8)
        dkgm = lambda: aug(batch)                                           # noqa: E731
        ddpm = lambda: ddpm_sample(model.stage2, (bs, c, h, w), steps, g)   # noqa: E731
        if steps > 100:     # one run is long already: warm up on 3 steps, time one full run
            ddpm_sample(model.stage2, (bs, c, h, w), 3, g)
            n, t = 1, {**race({"dkgm": dkgm}, reps), **race({"ddpm": ddpm}, 1, warmup=False)}
        else:
            n, t = reps, race({"dkgm": dkgm, "ddpm": ddpm}, reps)
        lines.append(f"| DKGM (KDE + debiasing) | {unet_calls(model)} | {bs} | {reps} | {fmt(bs / t['dkgm'])} | x1 |")
        lines.append(f"| DDPM-style, {steps} steps | {steps} | {bs} | {n} | {fmt(bs / t['ddpm'])} | "
                     f"{ratio(t['ddpm'] / t['dkgm'])} |")
        print("  " + lines[-1], flush=True)
    return lines


def epoch_data(model, n_images, quick):
    """A fixed subset of the data the generator was made for, or ``None`` and why not."""
    from dkgm_aug.data import digits, fashion_mnist
    if model.image_size == (8, 8) and model.channels == 1:
        ds, name = digits(), "sklearn digits"
    elif model.image_size == (28, 28) and model.channels == 1:
        try:
            ds, name = fashion_mnist(split="train"), "Fashion-MNIST train"
        except DataError as e:
            return None, f"skipped: {e}"
    else:
        return None, f"skipped: no bundled dataset of {model.image_size} images with {model.channels} channel(s)"
    return ds.subset(range(min(n_images, len(ds)))), name


def section_epoch(gen_name, model, n_images, reps, quick):
    import timm
    ds, name = epoch_data(model, n_images, quick)
    lines = ["### One training epoch with and without augmentation", ""]
    if ds is None:
        return lines + [f"Epoch benchmark {name}"], None
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", num_classes=10, in_chans=model.channels, pretrained=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(0))
    per_item, batched = DKGMAugment(gen_name, p=0.5, seed=0), DKGMAugment(gen_name, p=0.5, seed=1)
    ra = v2.Compose([v2.ToDtype(torch.uint8, scale=True), rand_augment(), v2.ToDtype(torch.float32, scale=True)])
    variants = {"(a) no augmentation": (None, None),
                "(b) DKGMAugment(p=0.5) per item, in the dataset transform": (per_item, None),
                "(c) DKGMAugment(p=0.5) on the collated batch": (None, batched),
                "(d) RandAugment per item, in the dataset transform": (ra, None)}

    def epoch(item_tf, batch_tf, max_batches=None):
        def run():
            ds.transform = item_tf
            net.train()
            for i, (x, y) in enumerate(loader):
                if i == max_batches:
                    break
                if batch_tf is not None:
                    x = batch_tf(x)
                loss = loss_fn(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return run
    for v in variants.values():         # warm-up: one batch each (loads the generator, allocator)
        epoch(*v, max_batches=1)()
    t = race({k: epoch(*v) for k, v in variants.items()}, reps, warmup=False)
    ds.transform = None
    lines += [f"`timm.create_model('resnet10t', in_chans={model.channels}, num_classes=10)` (random init), "
              f"forward + backward + Adam step over the first {len(ds)} images of {name} "
              f"({model.image_size[0]}x{model.image_size[1]}), one DataLoader (batch 64, shuffled, "
              f"num_workers=0) for all variants; median of {reps} epoch(s) after a one-batch warm-up each.", ""]
    return lines + slowdown_table(t, 2), t


class ItemByItem(torch.utils.data.Dataset):
    """``ds`` without ``__getitems__``: the DataLoader then fetches a batch one item at a time."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def section_on_demand(gen_name, model, n_items, reps):
    """A DataLoader over an on-demand ``BalancedDKGMDataset`` (cache=None: every synthetic item
    is generated when drawn): item by item vs one generator call per batch (``__getitems__``)."""
    ds, name = epoch_data(model, 4 * n_items, False)
    lines = ["### On-demand BalancedDKGMDataset in a DataLoader: item by item vs per batch", ""]
    if ds is None:
        return lines + [f"On-demand benchmark {name}"]
    ds.targets[: len(ds) // 2] = 0      # imbalanced: half the items in class 0, so there is something to add
    b = BalancedDKGMDataset(ds, gen_name, cache=None, progress=False)
    synthetic = list(range(b.n_real, b.n_real + min(n_items, b.n_synthetic)))

    def loader_run(dataset):
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, sampler=synthetic, num_workers=0)
        return lambda: [None for _ in loader]
    t = race({"item by item (`__getitem__`)": loader_run(ItemByItem(b)),
              "per batch (`__getitems__`, library)": loader_run(b)}, reps)
    lines += [f"{len(synthetic)} synthetic items of a wrap of the first {len(ds)} images of {name}, batch 64, "
              f"num_workers=0, `cache=None`; median of {reps} passes.", "",
              "| DataLoader fetch | synthetic images/s | speed-up |", "|---|---|---|"]
    base = t["item by item (`__getitem__`)"]
    lines += [f"| {k} | {fmt(len(synthetic) / v)} | {ratio(base / v)} |" for k, v in t.items()]
    for line in lines[-3:]:
        print("  " + line, flush=True)
    return lines


def section_image_size(sizes, bs, reps, channels=1):
    lines = ["### Cost vs image size", "",
             f"`DKGM.from_preset('tiny', image_size=s)` with random weights (the cost does not depend on "
             f"the weights), batch {bs}, the library path `augment.generate` (stage 1 + 4 stage-2 steps), "
             "next to `RandAugment` on the same uint8 batch.", "",
             "| image size | pixels | DKGM images/s | DKGM ms per image | DKGM us per pixel | "
             "RandAugment images/s | DKGM / RandAugment |", "|---|---|---|---|---|---|---|"]
    ra, rows = rand_augment(), []
    for s in sizes:
        torch.manual_seed(0)
        m = DKGM.from_preset("tiny", image_size=s, channels=channels).eval()
        x = torch.rand(bs, channels, s, s)
        xu = (x * 255).to(torch.uint8)
        seeds = list(range(bs))
        t = race({"dkgm": lambda: augment.generate(m, x, seeds), "ra": repeated(lambda: ra(xu), 20)}, reps)
        d, r = bs / t["dkgm"], 20 * bs / t["ra"]
        rows.append((s, d, r))
        lines.append(f"| {s}x{s} | {s * s} | {fmt(d)} | {1e3 / d:.3g} | {1e6 / d / (s * s):.3g} | {fmt(r)} | {ratio(d / r)} |")
        print("  " + lines[-1], flush=True)
    return lines, rows


def section_cpu_opts(gen_name, model, bs, chunk_batch, reps, compile_timeout, threads, quick):
    c, (h, w) = model.channels, model.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(bs, c, h, w, generator=g) * 2 - 1
    eps = torch.randn(bs, c, h, w, generator=g)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    cl_x, cl_eps = (v.contiguous(memory_format=torch.channels_last) for v in (x, eps))

    def bf16():
        return inference_autocast("cpu", torch.bfloat16)
    variants = {"autograd on (no context)": generation(model, x, eps, nullcontext),
                "torch.no_grad()": generation(model, x, eps, torch.no_grad),
                "torch.inference_mode() (library)": generation(model, x, eps),
                "channels_last model and input": generation(cl_model, cl_x, cl_eps),
                "bf16 autocast": generation(model, x, eps, bf16)}
    t = race(variants, reps)
    base = t["torch.inference_mode() (library)"]
    lines = ["### Speed-ups tried on CPU", "",
             f"`{gen_name}`, stage 1 + stage 2 on a batch of {bs}, {threads} thread(s). "
             "Speed-up = images/s over the library's path (inference_mode, fp32, contiguous); "
             "above x1 is faster.", "",
             "| variant | images/s | speed-up | kept in the library |", "|---|---|---|---|"]
    kept = {"torch.inference_mode() (library)": "yes (already)", "torch.no_grad()": "no (inference_mode is the stricter context)",
            "autograd on (no context)": "no", "channels_last model and input": "no", "bf16 autocast": "no"}
    lines += [f"| {k} | {fmt(bs / v)} | {ratio(base / v)} | {kept[k]} |" for k, v in t.items()]
    for line in lines[-len(t):]:
        print("  " + line, flush=True)

    # One call on a big batch vs the library's cache-sized chunks (same images, same seeds).
    chunk = augment.cpu_chunk(h, w)
    if chunk_batch > chunk:
        xb = torch.rand(chunk_batch, c, h, w, generator=g)
        seeds = list(range(chunk_batch))
        t = race({"one": lambda: model.neighbours_from_seeds(xb * 2 - 1, seeds),
                  "chunks": lambda: augment.generate(model, xb, seeds)}, max(2, reps // 2))
        lines.append(f"| batch {chunk_batch} in one U-Net batch | {fmt(chunk_batch / t['one'])} | x1 (reference) | no |")
        lines.append(f"| batch {chunk_batch} in chunks of {chunk} (`augment.generate`) | "
                     f"{fmt(chunk_batch / t['chunks'])} | {ratio(t['one'] / t['chunks'])} | yes (CPU only) |")
    else:
        why = f"batch {chunk_batch} fits one chunk" if chunk_batch else "--quick or --chunk-batch 0"
        lines.append(f"| chunks of {chunk} images vs one batch | - | skipped ({why}) | yes (CPU only) |")
    print("  " + lines[-1], flush=True)

    if quick or compile_timeout <= 0:
        lines.append("| torch.compile (inductor) | - | skipped (--quick or --compile-timeout 0) | no |")
    else:
        cmd = [sys.executable, __file__, "--child-compile", str(bs), "--generator", gen_name, "--threads", str(threads),
               "--repeats", str(reps)]
        try:
            child = subprocess.run(cmd, capture_output=True, text=True, timeout=compile_timeout)
            res = json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0 else None
        except subprocess.TimeoutExpired:
            child, res = None, None
        if res is not None:
            lines.append(f"| torch.compile (inductor), eager {fmt(res['eager'])} images/s in the same process | "
                         f"{fmt(res['compiled'])} | {ratio(res['compiled'] / res['eager'])} | "
                         f"no: first call took {res['compile_s']:.0f} s (once per process/worker) |")
        elif child is None:
            lines.append(f"| torch.compile (inductor) | - | failed: not compiled within {compile_timeout} s | no |")
        else:
            err = (child.stderr.strip().splitlines() or ["?"])[-1][:150].replace("|", "/")
            lines.append(f"| torch.compile (inductor) | - | failed: {err} | no |")
    print("  " + lines[-1], flush=True)
    return lines


def compile_child(gen_name, bs, reps) -> dict:
    model = load(gen_name).eval()
    c, (h, w) = model.channels, model.image_size
    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(bs, c, h, w, generator=g) * 2 - 1, torch.randn(bs, c, h, w, generator=g)
    compiled = copy.deepcopy(model)
    compiled.stage1, compiled.stage2 = torch.compile(compiled.stage1), torch.compile(compiled.stage2)
    t0 = time.perf_counter()
    generation(compiled, x, eps)()
    compile_s = time.perf_counter() - t0
    t = race({"eager": generation(model, x, eps), "compiled": generation(compiled, x, eps)}, reps)
    return dict(compile_s=compile_s, eager=bs / t["eager"], compiled=bs / t["compiled"])


# -- memory of wrapping ------------------------------------------------------------------------


class LabelsOnly(torch.utils.data.Dataset):
    """A dataset of ``n`` items with stored labels; wrapping reads a few items (``SPOT_CHECKS`` spread ones and
    the first of each of the ``CLASS_CHECKS`` smallest classes) to
    check that the stored labels are the items' own, and no more."""

    def __init__(self, n: int, n_classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, n_classes, (n,), generator=g)
        self.targets[: n // 2] = 0              # imbalanced: half the items in class 0
        self.reads = 0

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > SPOT_CHECKS + CLASS_CHECKS:
            raise RuntimeError(f"wrapping must not load more than the {SPOT_CHECKS} + {CLASS_CHECKS} items that "
                               "check the stored labels")
        return torch.zeros(1, 8, 8), int(self.targets[i])


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def wrap_memory(n: int, generator: str) -> str:
    ds = LabelsOnly(n)
    before = rss_mib()
    t = time.perf_counter()
    wrapped = BalancedDKGMDataset(ds, generator=generator, sampling_strategy="auto", progress=False)
    secs = time.perf_counter() - t
    after = rss_mib()
    return (f"{n:,} real items + {wrapped.n_synthetic:,} synthetic: RSS +{after - before:.1f} MiB "
            f"(peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB), "
            f"{secs:.2f} s to build the index plan")


# -- main ----------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="fashion-mnist-tiny")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--image-sizes", type=int, nargs="+", default=[8, 16, 28, 64])
    p.add_argument("--size-batch", type=int, default=16, help="batch of the image-size sweep")
    p.add_argument("--opt-batch", type=int, default=16, help="batch of the CPU speed-up comparison")
    p.add_argument("--ddpm-steps", type=int, nargs="+", default=[50, 1000])
    p.add_argument("--ddpm-batches", type=int, nargs="+", default=[16, 4], help="one batch size per --ddpm-steps")
    p.add_argument("--chunk-batch", type=int, default=256, help="batch of the chunked-vs-one-call comparison")
    p.add_argument("--epoch-images", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile-timeout", type=int, default=150, help="seconds; 0 skips torch.compile on CPU")
    p.add_argument("--wrap-items", type=int, default=1_000_000)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child-wrap", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-compile", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_wrap:                         # child process: a clean RSS baseline
        print(wrap_memory(args.child_wrap, args.generator))
        return 0
    if args.child_compile:                      # child process: torch.compile under a time limit
        print(json.dumps(compile_child(args.generator, args.child_compile, args.repeats)))
        return 0
    if args.quick:
        args.batch_sizes, args.image_sizes, args.size_batch, args.opt_batch = [1, 4, 16], [8, 16], 4, 4
        args.ddpm_steps, args.ddpm_batches, args.epoch_images, args.repeats, args.chunk_batch = [5, 10], [4, 4], 64, 2, 0
        args.wrap_items = 20_000
    if len(args.ddpm_batches) != len(args.ddpm_steps):
        p.error("give one --ddpm-batches value per --ddpm-steps value")
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    model = load(args.generator).eval()
    h, w = model.image_size
    import timm
    import torchvision
    head = [f"Generator `{args.generator}` ({h}x{w}, steps {model.steps}), {platform.machine()} CPU, "
            f"{args.threads} torch thread(s), torch {torch.__version__}.", "",
            f"Command: `python benchmarks/speed.py {' '.join(argv)}`", "",
            f"Hardware: {cpu_name()}, {os.cpu_count()} logical CPUs; torchvision {torchvision.__version__}, "
            f"timm {timm.__version__}, Python {platform.python_version()}. "
            f"Load average (1, 5, 15 min) at the start: {', '.join(f'{v:.2f}' for v in load_before)}."]

    print("throughput:", flush=True)
    existing, vs_ra, _, batch_rows = section_throughput(args.generator, model, args.batch_sizes, args.repeats, args.quick)
    print("DDPM-style:", flush=True)
    ddpm = section_ddpm(model, args.generator, args.ddpm_steps, args.ddpm_batches, args.repeats, args.quick)
    print("epoch:", flush=True)
    epoch, _ = section_epoch(args.generator, model, args.epoch_images, 1 if args.quick else 3, args.quick)
    print("on demand:", flush=True)
    on_demand = section_on_demand(args.generator, model, 32 if args.quick else 256, 1 if args.quick else 3)
    print("image size:", flush=True)
    sizes, size_rows = section_image_size(args.image_sizes, args.size_batch, args.repeats)
    print("CPU speed-ups:", flush=True)
    opts = section_cpu_opts(args.generator, model, args.opt_batch, args.chunk_batch, args.repeats,
                            args.compile_timeout, args.threads, args.quick)
    gpu = ["### GPU", "", "The GPU rows come from `benchmarks/speed_gpu.py`, run on a GPU machine "
           "(its report: `speed_gpu.md`, next to this one)."]

    child = subprocess.run([sys.executable, __file__, "--child-wrap", str(args.wrap_items), "--generator", args.generator,
                            "--threads", str(args.threads)], capture_output=True, text=True, check=True)
    memory = ("Memory of `BalancedDKGMDataset(sampling_strategy='auto')` over a labels-only dataset: "
              + child.stdout.strip())
    print(memory)
    load_after = os.getloadavg()
    wall = time.perf_counter() - t_start
    head[-1] += (f" At the end: {', '.join(f'{v:.2f}' for v in load_after)}. Whole run {wall:.0f} s. "
                 "Other jobs shared the machine: compare numbers within a table, not across runs.")
    lines = head + [""] + existing + ["", memory, ""]
    for part in (vs_ra, ddpm, epoch, on_demand, sizes, opts, gpu):
        lines += part + [""]
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        png = out.with_suffix(".png")
        plot(png, batch_rows, size_rows, args.generator, f"CPU, {args.threads} thread(s)")
        lines += [f"Plot: `{png.name}` (images/s vs batch size and vs image size, log scales)."]
        out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
