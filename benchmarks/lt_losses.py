"""The long-tailed benchmark's methods by kind, and the loss side of them: class-balanced
weights (Cui et al. 2019), deferred re-weighting, LDAM margins, the training loss of each
loss-side method (``loss_fn``) and mixup. ``imbalanced.py``'s docstring describes each method."""
import torch
import torch.nn.functional as F


# -- the methods, in the report's order ------------------------------------------------------------
METHODS = ("ce", "cb_loss", "drw", "ldam_drw", "balanced_softmax", "mixup", "mixup_drw", "ros", "drs", "smote",
           "randaug", "dkgm_balanced", "dkgm_augment", "ros_dkgm", "loss_dkgm", "dkgm_deferred", "evae_balanced", "kss_balanced")
BALANCED = ("dkgm_balanced", "evae_balanced", "kss_balanced")
AUGMENTED = ("dkgm_augment", "ros_dkgm", "loss_dkgm")   # DKGMAugment(p=--dkgm-p) on each batch's minority items
LOSSES = ("ce", "cb_loss", "drw", "ldam_drw", "balanced_softmax", "mixup", "mixup_drw")
GENERATIVE = BALANCED + AUGMENTED + ("dkgm_deferred",)
DEFERRED = {"drs": "ros", "dkgm_deferred": "dkgm_balanced"}   # ce on the long-tailed set, then this method's pool


# -- losses ----------------------------------------------------------------------------------------
def class_balanced_weights(counts, beta: float = 0.999) -> torch.Tensor:
    """Cui et al.'s (1 - beta) / (1 - beta ** n_c), scaled so the weights sum to the class count."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    w = (1 - beta) / (1 - beta ** n)
    return (w * len(n) / w.sum()).float()


def drw_weights(counts, progress: float, start: float):
    """Deferred re-weighting: no weights before ``start`` (a fraction of the run), then class-balanced."""
    return class_balanced_weights(counts) if progress >= start else None


def ldam_margins(counts, largest: float) -> torch.Tensor:
    """LDAM's per-class margins, proportional to n_c^(-1/4), the largest equal to ``largest``."""
    m = torch.as_tensor(counts, dtype=torch.float64) ** -0.25
    return (m * (largest / m.max())).float()


def loss_fn(method: str, logits, y, counts, progress: float, args, mix=None):
    """The training loss of a loss-side ``method`` at ``progress`` (fraction of the run done).
    ``mix = (lam, y_b)``: the batch was mixed as ``lam * x + (1 - lam) * x[perm]`` (mixup)."""
    counts = torch.as_tensor(counts).tolist()
    weight = drw_weights(counts, progress, args.drw_start) if method in ("drw", "ldam_drw", "mixup_drw") else (
        class_balanced_weights(counts) if method == "cb_loss" else None)
    weight = None if weight is None else weight.to(logits.device)
    if method == "ldam_drw":
        margins = ldam_margins(counts, args.ldam_margin).to(logits.device)
        logits = args.ldam_s * (logits - F.one_hot(y, logits.shape[1]) * margins[y][:, None])
    if method == "balanced_softmax":
        prior = torch.as_tensor(counts, dtype=torch.float32, device=logits.device) / float(sum(counts))
        logits = logits + args.la_tau * prior.log()
    loss = F.cross_entropy(logits, y, weight=weight)
    if mix is not None:
        lam, y_b = mix
        loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y_b, weight=weight)
    return loss


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, g: torch.Generator):
    """``(mixed batch, (lam, partner labels))``: one Beta(alpha, alpha) weight per batch, as in Zhang et al."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
    perm = torch.randperm(len(x), generator=g).to(x.device)
    return lam * x + (1 - lam) * x[perm], (lam, y[perm])
