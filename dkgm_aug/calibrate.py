"""Calibrated knobs: the stage-2 ``steps`` and the ``alpha`` a DKGM generator should use by default.

    dkgm-aug calibrate gen.safetensors --evaluator fashion-mnist-evaluator --out gen-calibrated.safetensors

Neighbours of ``n`` training images are made for every ``(alpha, steps)`` of a grid, with fixed
per-image seeds, and scored by an evaluator classifier: sharpness (the paper's Laplacian
variance) and label preservation (share the evaluator puts in the source's class). The rule:

1. keep the settings whose label preservation is within ``tolerance`` of the evaluator's
   accuracy on the real sources themselves;
2. among them, take the one whose sharpness is closest to the sources' (ratio nearest 1);
3. ties go to the larger alpha (more diverse neighbours).

When no setting keeps the labels, the one with the best label preservation is taken and the
result says so. Labels the evaluator has no class for, and real sources it puts in their own class
less than half the time (the data's class order is not the evaluator's), are refused. Only training images are used: no knob is chosen by looking at test data.
The chosen knobs become the model's ``alpha`` and ``steps``, which ``DKGMAugment`` and
``BalancedDKGMDataset`` use when given none; the whole grid is kept in ``info["calibration"]``.
"""
import torch

from ._validate import check_float, check_int
from .errors import DataError, DKGMError
from .features import features, neighbour_quality
from .data import stored_tensors
from .images import from_model, tensor_unit, to_model, to_unit_float
from .sampling import check_class_order
from .kernels import noise_from_seeds
from .nn import evaluating

ALPHAS = (0.1, 0.25, 0.5, 0.75, 1.0)
STEPS = (0, 1, 2, 3, 4, 6, 8)
REAL_MIN = 0.5      # the evaluator must put at least this share of the real images in their own class


@torch.inference_mode()
def score_grid(model, images01: torch.Tensor, labels: torch.Tensor, evaluator, alphas=ALPHAS, steps=STEPS,
               seed: int = 0) -> list:
    """One dict per ``(alpha, steps)``: sharpness and label preservation of the neighbours of ``images01``."""
    x = to_model(images01).to(next(model.parameters()).device)    # the grid runs where the model is
    seeds = [seed * 1_000_003 + i for i in range(len(x))]
    eps = noise_from_seeds(seeds, x.shape[1:], model.kernel, x.device, x.dtype)
    ref = features(evaluator, images01)
    # a class-conditional generator makes each neighbour from its source's class
    cond = dict(labels=labels.to(x.device)) if getattr(model, "conditional", False) else {}
    rows = []
    for alpha in alphas:
        kde = model.kde(x, alpha=alpha, eps=eps, **cond)
        for n in steps:
            q = neighbour_quality(evaluator, from_model(model.debias(kde, n, **cond).clamp(-1, 1)).cpu(), labels, ref)
            rows.append(dict(alpha=alpha, steps=n, **q))
    return rows


def choose(rows: list, real: dict, tolerance: float) -> dict:
    """The calibration rule of the module docstring; returns the chosen row plus ``labels_kept``."""
    # label preservation is a share k/n: a setting exactly on the limit is within it, whatever the
    # float rounding of the subtraction (0.92 - 0.1 is 0.8200000000000001)
    floor = real["label_preservation"] - tolerance - 1e-9
    kept = [r for r in rows if r["label_preservation"] >= floor]
    if not kept:
        best = max(rows, key=lambda r: (r["label_preservation"], r["alpha"]))
        return dict(best, labels_kept=False)
    best = min(kept, key=lambda r: (round(abs(r["sharpness"] / real["sharpness"] - 1), 6), -r["alpha"]))
    return dict(best, labels_kept=True)


def calibrate(model, dataset, evaluator, n: int = 500, tolerance: float = 0.03, alphas=ALPHAS, steps=STEPS,
              seed: int = 0) -> dict:
    """Pick and set ``model.alpha``/``model.steps`` from ``n`` images of ``dataset`` (an ImageDataset, or
    any map-style dataset of ``(image, label)`` items, labels the classes of ``evaluator``); returns the
    record stored in ``model.info["calibration"]``. A class-conditional model refuses data whose class
    names sit at other indices than the ones it was trained with."""
    n = check_int("n", n, 2)
    tolerance = check_float("tolerance", tolerance, 0.0, 1.0)
    if not hasattr(model, "debias"):
        raise DKGMError(f"calibrate takes a DKGM generator, got {type(model).__name__}")
    check_class_order(model, dataset)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n]
    stored = stored_tensors(dataset)
    if stored is not None:
        images01, labels = tensor_unit(stored[0][idx]), torch.as_tensor(stored[1])[idx]
    else:     # through the dataset's transform: the images it serves, its random draws seeded by `seed`
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)   # the CPU generator only: the one forked (GPUs untouched)
            items = [dataset[int(i)] for i in idx]
        images01 = torch.stack([to_unit_float(it[0]) for it in items])
        labels = torch.as_tensor([int(it[1]) for it in items])
    with evaluating(model):
        real = neighbour_quality(evaluator, images01, labels, features(evaluator, images01))
        if real["label_preservation"] < REAL_MIN:
            names = getattr(dataset, "classes", None)
            raise DataError(f"the evaluator assigns {real['label_preservation']:.2f} of the real images to their "
                            "own class, so label preservation cannot rank the settings: the data's class order "
                            "probably differs from the evaluator's" + (f" (the data's classes: {list(names)[:5]}...;"
                            " an image folder's are its sorted folder names)" if names else "")
                            + ", or the evaluator is too weak for this data; give the labels as the evaluator's "
                            "class indices, or use (benchmarks/train_evaluator.py: train) an evaluator of this data")
        rows = score_grid(model, images01, labels, evaluator, alphas, steps, seed)
    chosen = choose(rows, real, tolerance)
    model.alpha, model.steps = float(chosen["alpha"]), int(chosen["steps"])
    record = dict(alpha=model.alpha, steps=model.steps, labels_kept=chosen["labels_kept"], tolerance=tolerance,
                  n=len(idx), seed=seed, real=real, grid=rows,
                  evaluator=getattr(evaluator, "info", {}).get("evaluator", {}).get("data", "given"))
    model.info["calibration"] = record
    return record
