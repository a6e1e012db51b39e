"""Helpers the benchmark scripts share. The scripts run from the repository root as
``python benchmarks/<name>.py``, which puts this folder on ``sys.path``; a script imports this
module and its own ``lt_*`` modules (``imbalanced.py``: ``lt_losses``, ``lt_data``, ``lt_run``,
``lt_records``, ``lt_report``), never another script.

* the machine and the reports: :func:`cpu_name`, :func:`write_lines`;
* the yardstick that scores generated images of a dataset: :func:`yardstick`;
* the long-tailed splits of ``imbalanced.py``: :data:`SHIPPED`, :func:`long_tailed_split`,
  :func:`tail_classes`;
* timing (``speed.py`` and ``speed_gpu.py``): :func:`race`, the DDPM-style sampler the
  generator is compared with, and the report's tables and plot.
"""
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


# -- the machine and the reports -----------------------------------------------------------------
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_lines(path, lines) -> None:
    """Write a report, one list item per line, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# -- the yardstick -------------------------------------------------------------------------------
# Feature nets trained by the benchmarks themselves: the yardstick of a dataset that has no
# shipped evaluator yet, so that its tables keep one fixed classifier.
FEATURE_NETS = {"digits": RESULTS / "featurenet_digits.safetensors",
                "fashion-mnist": RESULTS / "featurenet_fmnist.safetensors"}


def yardstick(data: str, path=None):
    """``(classifier, description)``: the FeatureNet whose penultimate features (Frechet
    distances) and predictions (label preservation) score images of ``data``, and a phrase
    naming it for a report. ``path`` (a FeatureNet file) if given, else the shipped evaluator
    ``<data>-evaluator``, else the benchmarks' feature net ``results/featurenet_<data>``."""
    from dkgm_aug.features import load_feature_net
    from dkgm_aug.label_filter import list_evaluators, load_evaluator
    if path is not None:
        return load_feature_net(path), f"the feature net `{path}`"
    name = f"{data}-evaluator"
    if name in list_evaluators():
        return load_evaluator(name), f"the shipped evaluator `{name}`"
    old = FEATURE_NETS.get(data)
    if old is None or not old.is_file():
        raise FileNotFoundError(f"no yardstick for {data!r}: no shipped {name!r} and no feature net "
                                f"{old}; make one with `python benchmarks/train_evaluator.py --data {data}`")
    return load_feature_net(old), f"the feature net `benchmarks/results/{old.name}` (no shipped `{name}`)"


# -- long-tailed splits --------------------------------------------------------------------------
SHIPPED = {"digits": "digits-tiny", "fashion-mnist": "fashion-mnist-tiny"}   # generator per dataset


def long_tailed_split(data: str, rho: float, split_seed: int, order=None, profile: str = "exp"):
    """(long-tailed train set, balanced test set); ``split_seed`` fixes the digits train/test
    split and which images the long-tailed subset keeps; ``order``/``profile`` as in
    ``dkgm_aug.data.long_tailed_indices``."""
    from dkgm_aug.data import digits, fashion_mnist, long_tailed_indices
    if data == "digits":
        train, test = digits("train", seed=split_seed), digits("test", seed=split_seed)
    else:
        train, test = fashion_mnist(split="train"), fashion_mnist(split="test")
    return train.subset(long_tailed_indices(train.targets, rho, split_seed, order, profile)), test


def tail_classes(train_counts, fraction: float = 1 / 3) -> list:
    """The rarest ``fraction`` of classes by training count (at least one), and every class as rare
    as the last of them: a step profile's five classes of n_max / rho are all its tail (ties were
    broken by index, which made three of them the tail and two not)."""
    counts = np.asarray(train_counts)
    n_tail = max(1, int(round(len(counts) * fraction)))
    cut = np.sort(counts, kind="stable")[n_tail - 1]
    return np.flatnonzero(counts <= cut).tolist()


# -- timing --------------------------------------------------------------------------------------
def race(fns: dict, repeats: int, sync=lambda: None, warmup: bool = True) -> dict:
    """Median seconds per call of each ``fns[name]()``: one warm-up call each, then
    ``repeats`` rounds in which every variant runs once, in turn."""
    if warmup:
        for fn in fns.values():
            fn()
            sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ratio(r: float) -> str:
    return f"x{r:.3g}" if r >= 0.01 else f"x{r:.2e}"


def fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def rand_augment():
    from torchvision.transforms import v2
    return v2.RandAugment()


@torch.inference_mode()
def ddpm_sample(unet, shape, steps: int, generator=None) -> torch.Tensor:
    """DDPM ancestral sampling over ``steps`` of the 1000 linear-beta time steps (evenly
    respaced): one call of ``unet(x, t)`` per step, the cost of a diffusion sampler
    built on the same network."""
    abar_all = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    ts = torch.linspace(999, 0, steps).round().long()
    abar = abar_all[ts]
    abar_prev = torch.cat([abar[1:], torch.ones(1)])
    device = generator.device if generator is not None else next(unet.parameters()).device
    x = torch.randn(shape, generator=generator, device=device)
    for i, t in enumerate(ts.tolist()):
        eps = unet(x, t)
        beta = 1 - abar[i] / abar_prev[i]
        x = (x - beta / (1 - abar[i]).sqrt() * eps) / (1 - beta).sqrt()
        if i < steps - 1:
            x = x + ((1 - abar_prev[i]) / (1 - abar[i]) * beta).sqrt() * torch.randn(shape, generator=generator, device=device)
    return x.clamp(-1, 1)


def generation(model, x: torch.Tensor, eps: torch.Tensor, ctx=torch.inference_mode):
    """Stage 1 then stage 2 on ``[-1, 1]`` images with given noise, under ``ctx`` (the
    library's path without its ``inference_mode`` decorators)."""
    def run():
        with ctx():
            return model.debias(model.kde(x, eps=eps)).clamp(-1, 1)
    return run


@contextmanager
def inference_autocast(device_type: str, dtype: torch.dtype):
    with torch.inference_mode(), torch.autocast(device_type, dtype=dtype):
        yield


def unet_calls(model) -> int:
    return 1 + model.steps + 1      # stage 1, then u(x, 0) and t = 1..steps


def slowdown_table(t: dict, digits: int) -> list:
    """Seconds per epoch of each variant and its slowdown against ``(a) no augmentation``; printed too."""
    base = t["(a) no augmentation"]
    rows = [f"| {k} | {v:.{digits}f} | {ratio(v / base)} |" for k, v in t.items()]
    for line in rows:
        print("  " + line, flush=True)
    return ["| variant | seconds per epoch | slowdown vs (a) |", "|---|---|---|"] + rows


def plot(path, batch_rows, size_rows, gen_name, title, labels=("DKGM", "RandAugment")):
    """Two log-log panels: images/s vs batch size and vs image side, two series each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, xlabel, panel in ((axes[0], batch_rows, "batch size", f"{gen_name}: images/s vs batch size"),
                                    (axes[1], size_rows, "image side (pixels)", "tiny preset, random weights: vs image size")):
        if not rows:                # a table that was not run (speed_gpu.py --sections)
            ax.set_visible(False)
            continue
        xs = [r[0] for r in rows]
        ax.plot(xs, [r[1] for r in rows], "o-", label=labels[0])
        ax.plot(xs, [r[2] for r in rows], "s--", label=labels[1])
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="images/s", title=panel)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
