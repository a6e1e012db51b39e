"""The two-stage DKGM generator (docs/design.md, section 1).

Stage 1, ``f_theta``: a U-Net trained as a denoiser, so that
``x_kde = f_theta(x + alpha * eps)`` is a KDE neighbour of a real image ``x``.
Stage 2, ``u_gamma(., t)``: a time-embedded U-Net that removes the KDE blur with
the iterative update of :meth:`DKGM.debias`.

Images are ``[B, C, H, W]`` floats in ``[-1, 1]``; conversions happen at the edges.

Example::

    model = DKGM.from_preset("tiny", image_size=28, channels=1)
    loss = model(x, stage=1)                 # eq. (14); stage=2 gives eq. (15)
    x_new = model.sample(x, alpha=0.5, steps=4, generator=torch.Generator().manual_seed(0))

Class-conditional variant (opt-in, docs/design.md): ``DKGM.from_preset(..., num_classes=10)``, or
``model.with_labels(10)`` to warm-start from an unconditional generator; every method then takes
each image's class index, ``labels=y``.
"""
import copy
import numbers

import torch
from torch import nn
import torch.nn.functional as F

from ._validate import ALPHA_MAX, STEPS_MAX, check_float, check_int
from .blur import gaussian_blur, random_blur
from .checkpoint import register_kind
from .errors import DataError, DKGMError
from .kernels import KERNELS, noise, noise_from_seeds
from .sampling import label_tensor
from .unet import UNet, UNetConfig, preset_config


def check_images(x: torch.Tensor, channels: int, name: str = "x") -> None:
    """Raise a clear error unless ``x`` is a finite float ``[B, channels, H, W]`` batch."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise DataError(f"{name} must have shape [B, C, H, W], got {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise DataError(f"{name} has {x.shape[1]} channels but the model takes {channels}; "
                        "convert the images (e.g. grayscale <-> RGB) before calling it")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise DataError(f"{name} is empty: shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"{name} must be a float tensor in [-1, 1], got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name} contains NaN or inf values; clean the data first")


def class_indices(labels, n: int, num_classes: int, device=None) -> torch.Tensor:
    """``labels`` (a 1-D integer tensor or array, or a list or tuple of ints, numpy integers or 0-d
    integer tensors) as a LongTensor ``[n]`` on ``device``, checked: one class index in
    ``[0, num_classes)`` per image."""
    if labels is None:
        raise DataError(f"this generator is class-conditional ({num_classes} classes): give each image's "
                        "class index, labels=...")
    y = label_tensor(labels)
    if len(y) != n:
        raise DataError(f"{len(y)} labels for {n} images: give one class index per image")
    lo, hi = (int(v) for v in torch.stack([y.min(), y.max()]).tolist()) if n else (0, 0)
    if lo < 0 or hi >= num_classes:
        raise DataError(f"labels must be class indices in [0, {num_classes}) (this generator has {num_classes} "
                        f"classes), got values from {lo} to {hi}")
    return y.to(device=device, dtype=torch.long)


def check_stages(stages, num_classes: int) -> tuple:
    """The class-conditional stages: a subset of ``(1, 2)``, not empty when ``num_classes > 0``."""
    if not isinstance(stages, (tuple, list)) or not set(stages) <= {1, 2} or len(set(stages)) != len(stages) \
            or any(isinstance(s, bool) for s in stages):
        raise DKGMError(f"conditional stages must be a subset of (1, 2), e.g. (1, 2) or (1,), got {stages!r}")
    if num_classes and not stages:
        raise DKGMError("num_classes > 0 needs at least one conditional stage: (1,), (2,) or (1, 2)")
    return tuple(sorted(stages))


@register_kind
class DKGM(nn.Module):
    """Both DKGM stages, their losses and Algorithm 2.

    Knobs: ``alpha`` (sampling noise level: diversity), ``alpha_train`` (stage-1
    training noise level), ``steps`` (``n``), ``b_range`` (stage-2 training blur),
    ``kernel`` (``"gaussian"`` or ``"epanechnikov"``, both unit variance) and ``m``
    (noisy copies per image in eq. 14).

    ``labels``: each image's class index, for a class-conditional DKGM (a stage built with
    ``UNetConfig(num_classes=...)``), which refuses calls without them; an unconditional DKGM
    accepts them, for the common generator interface, and ignores them.
    """

    kind = "dkgm"

    def __init__(self, stage1: UNetConfig, stage2: UNetConfig, image_size=(28, 28), alpha: float = 0.5,
                 alpha_train: float = 0.5, steps: int = 4, b_range=(0.5, 1.0), kernel: str = "gaussian",
                 m: int = 1, info: dict | None = None):
        super().__init__()
        if stage1.channels != stage2.channels:
            raise DKGMError("stage 1 and stage 2 must take the same number of channels")
        if stage1.time_input or not stage2.time_input:
            raise DKGMError("stage 1 takes no time input and stage 2 does (set UNetConfig.time_input)")
        if stage1.num_classes and stage2.num_classes and stage1.num_classes != stage2.num_classes:
            raise DKGMError(f"the conditional stages must have the same num_classes, got {stage1.num_classes} "
                            f"and {stage2.num_classes}")
        if kernel not in KERNELS:
            raise DKGMError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
        check_knobs(alpha=alpha, steps=steps)
        check_knobs(alpha=alpha_train)
        if (not isinstance(b_range, (tuple, list)) or len(b_range) != 2
                or not all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in b_range)
                or not (0 < b_range[0] <= b_range[1] <= 100)):
            raise DKGMError(f"b_range must satisfy 0 < b_min <= b_max, got {tuple(b_range)}")
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 1 <= m <= 64:
            raise DKGMError(f"m (noisy copies per image) must be an integer in [1, 64], got {m!r}")
        size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        if len(size) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                     and 1 <= v <= 8192 for v in size):
            raise DKGMError(f"image_size must be an int or (H, W) with sides in [1, 8192], got {image_size!r}")
        if not isinstance(info, (dict, type(None))):
            raise DKGMError(f"info must be a dict, got {type(info).__name__}")
        self.stage1, self.stage2 = UNet(stage1), UNet(stage2)
        self._classes = {1: stage1.num_classes, 2: stage2.num_classes}   # also while DDP wraps a stage
        self.image_size = tuple(int(v) for v in size)
        self.channels = stage1.channels
        self.alpha, self.alpha_train, self.steps = float(alpha), float(alpha_train), int(steps)
        self.b_range = (float(b_range[0]), float(b_range[1]))
        self.kernel, self.m = kernel, int(m)
        self.info = dict(info or {})   # free-form: class names, training data, command, timings

    @classmethod
    def from_preset(cls, name: str, image_size=28, channels: int = 1, num_classes: int = 0,
                    conditional_stages=(1, 2), **knobs) -> "DKGM":
        """Both stages at a preset's size; ``num_classes > 0``: the ``conditional_stages`` are class-conditional."""
        stages = check_stages(conditional_stages, num_classes)
        n = {s: num_classes if s in stages else 0 for s in (1, 2)}
        return cls(preset_config(name, channels, False, n[1]), preset_config(name, channels, True, n[2]),
                   image_size=image_size, **knobs)

    @property
    def num_classes(self) -> int:
        """The number of classes of the class-conditional stage(s); 0 for the unconditional DKGM."""
        return max(self._classes.values())

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def with_labels(self, num_classes: int, stages=(1,)) -> "DKGM":
        """A new DKGM whose ``stages`` are class-conditional, warm-started from this one (left as is):
        all its weights, knobs and ``info``, and a label pathway that starts silent, so that the new
        model computes this one's function for every label until it is fine-tuned (with the Trainer,
        on ``(image, label)`` data)."""
        num_classes, stages = check_int("num_classes", num_classes, 1, 100_000), check_stages(stages, 1)
        taken = [s for s in stages if self._classes[s]]
        if taken:
            raise DKGMError(f"stage(s) {taken} are class-conditional already; with_labels adds labels to "
                            "unconditional stages")
        other = {self._classes[s] for s in (1, 2) if s not in stages} - {0, num_classes}
        if other:
            raise DKGMError(f"the conditional stages must have the same num_classes: the other stage has "
                            f"{other.pop()}, got num_classes={num_classes}")
        new = copy.deepcopy(self)
        for s in stages:
            setattr(new, f"stage{s}", getattr(self, f"stage{s}").with_labels(num_classes))
            new._classes[s] = num_classes
        new.info["conditional_from"] = dict(num_classes=num_classes, stages=list(stages))
        return new

    def _labels(self, labels, x: torch.Tensor):
        """The class indices the conditional stage(s) take (checked), or ``None`` when unconditional."""
        if not self.conditional:
            return None
        if not isinstance(x, torch.Tensor):
            check_images(x, self.channels)
        return class_indices(labels, len(x), self.num_classes, x.device)

    def _net(self, stage: int, z: torch.Tensor, t=None, y=None) -> torch.Tensor:
        """Stage ``stage``'s network on ``z`` (at time ``t`` for stage 2), given ``y`` when it is conditional."""
        net = self.stage1 if stage == 1 else self.stage2
        kw = dict(labels=y) if self._classes[stage] else {}
        return net(z, **kw) if t is None else net(z, t, **kw)

    # -- configuration stored in checkpoints -------------------------------------------------
    def config(self) -> dict:
        return dict(stage1=self.stage1.config.to_dict(), stage2=self.stage2.config.to_dict(),
                    image_size=list(self.image_size), alpha=self.alpha, alpha_train=self.alpha_train,
                    steps=self.steps, b_range=list(self.b_range), kernel=self.kernel, m=self.m, info=self.info)

    @classmethod
    def from_config(cls, cfg: dict) -> "DKGM":
        if not isinstance(cfg, dict) or not {"stage1", "stage2"} <= set(cfg):
            raise DKGMError("a DKGM config must be a dict with 'stage1' and 'stage2'")
        cfg = dict(cfg)
        return cls(UNetConfig.from_dict(cfg.pop("stage1")), UNetConfig.from_dict(cfg.pop("stage2")), **cfg)

    def save(self, path, **info) -> None:
        from .checkpoint import save
        save(self, path, **info)

    # -- stage 1 -------------------------------------------------------------------------------
    def kde(self, x: torch.Tensor, alpha: float | None = None, generator=None, eps=None, labels=None) -> torch.Tensor:
        """Stage 1: ``f_theta(x + alpha * eps)``, one KDE neighbour per image. ``eps`` (unit
        variance, shaped like ``x``) may be given, e.g. drawn per image with its own seed."""
        check_images(x, self.channels)
        return self._kde(x, alpha, generator, eps, self._labels(labels, x))

    def _kde(self, x, alpha, generator, eps, y) -> torch.Tensor:
        alpha = self.alpha if alpha is None else check_knobs(alpha=alpha)
        if eps is None:
            eps = noise(x.shape, self.kernel, generator, x.device, x.dtype)
        elif eps.shape != x.shape:
            raise DKGMError(f"eps has shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
        return self._net(1, x + alpha * eps, None, y)

    def stage1_loss(self, x: torch.Tensor, generator=None, labels=None) -> torch.Tensor:
        """Eq. (14): sum over ``m`` noisy copies of the per-image mean squared error, averaged over the batch."""
        y = self._labels(labels, x)
        xm = x.repeat(self.m, 1, 1, 1)
        eps = noise(xm.shape, self.kernel, generator, x.device, x.dtype)
        err = (xm - self._net(1, xm + self.alpha_train * eps, None, None if y is None else y.repeat(self.m)))
        return err.pow(2).flatten(1).mean(1).view(self.m, -1).sum(0).mean()

    # -- stage 2 -------------------------------------------------------------------------------
    def debias(self, x_in: torch.Tensor, steps: int | None = None, labels=None) -> torch.Tensor:
        """Stage 2 alone (Algorithm 2, lines 4-6), the same function for training and sampling::

            x_hat_0 = u(x_in, 0)
            x_hat_t = x_hat_{t-1} + (1/t) * u(x_in - x_hat_{t-1}, t),   t = 1..steps
        """
        check_images(x_in, self.channels, "x_in")
        return self._debias(x_in, steps, self._labels(labels, x_in))

    def _debias(self, x_in, steps, y) -> torch.Tensor:
        steps = self.steps if steps is None else check_knobs(steps=steps)
        # time steps go in as tensors, not ints: torch.compile (compile=True in DKGMAugment and
        # BalancedDKGMDataset) would specialise stage 2 on, and recompile it for, each int
        ts = torch.arange(steps + 1, device=x_in.device)
        x_hat = self._net(2, x_in, ts[0], y)
        for t in range(1, steps + 1):
            x_hat = x_hat + self._net(2, x_in - x_hat, ts[t], y) / t
        return x_hat

    def stage2_loss(self, x: torch.Tensor, generator=None, labels=None) -> torch.Tensor:
        """Clean-image target on Gaussian-blurred input, backpropagated through all ``n+1`` calls."""
        y = self._labels(labels, x)
        x_in = random_blur(x, self.b_range, generator)
        check_images(x_in, self.channels, "x_in")
        return F.mse_loss(self._debias(x_in, None, y), x)

    # -- what the trainer asks of a model (dkgm_aug.trainer) ----------------------------------
    stages = (1, 2)

    def stage_module(self, stage: int) -> nn.Module:
        """The network that training ``stage`` updates."""
        if stage not in self.stages:
            raise DKGMError(f"stage must be 1 or 2, got {stage!r}")
        return self.stage1 if stage == 1 else self.stage2

    def forward(self, x: torch.Tensor, stage: int = 1, generator=None, labels=None) -> torch.Tensor:
        """Training loss of ``stage`` (1 or 2) on a batch of clean images (of classes ``labels``)."""
        check_images(x, self.channels)
        if stage == 1:
            return self.stage1_loss(x, generator, labels)
        if stage == 2:
            return self.stage2_loss(x, generator, labels)
        raise DKGMError(f"stage must be 1 or 2, got {stage!r}")

    @torch.no_grad()
    def preview(self, x: torch.Tensor, stage: int, generator=None, labels=None) -> list:
        """The rows of a training sample grid: the real images, their stage-1 KDE neighbours and
        those debiased by stage 2; while training stage 2 also the images blurred as stage 2
        learns from them, and stage 2 on those."""
        y = self._labels(labels, x)
        rows = [x, *self.sample(x, generator=generator, return_stages=True, labels=y)]
        if stage == 2:
            blurred = gaussian_blur(x, sum(self.b_range) / 2)
            rows += [blurred, self._debias(blurred, None, y).clamp(-1, 1)]
        return rows

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, x: torch.Tensor, alpha: float | None = None, steps: int | None = None,
               generator=None, eps=None, return_stages: bool = False, labels=None):
        """Algorithm 2: a debiased KDE neighbour of each image, clamped to ``[-1, 1]``.
        ``steps=0`` runs only ``u(x_kde, 0)``. ``return_stages=True`` gives ``(stage 1, stage 1+2)``,
        both clamped; stage 2 sees the unclamped stage-1 output either way."""
        check_images(x, self.channels)
        y = self._labels(labels, x)
        kde = self._kde(x, alpha, generator, eps, y)
        out = self._debias(kde, steps, y).clamp(-1, 1)
        return (kde.clamp(-1, 1), out) if return_stages else out

    @torch.inference_mode()
    def neighbours_from_seeds(self, x: torch.Tensor, seeds, *, labels=None, alpha: float | None = None,
                              steps: int | None = None) -> torch.Tensor:
        """The generator interface used by the augmentation API: one neighbour per image,
        image ``i``'s noise a counter-based draw from ``seeds[i]`` alone, made on ``x``'s device
        (:func:`dkgm_aug.kernels.noise_from_seeds`), so that the result does not depend on the
        batch it was made in. ``labels``: as in :meth:`neighbours`."""
        if len(seeds) != len(x):
            raise DKGMError(f"{len(seeds)} seeds for {len(x)} images")
        eps = noise_from_seeds(seeds, x.shape[1:], self.kernel, x.device, x.dtype)
        return self.sample(x, alpha, steps, eps=eps, labels=labels)

    @torch.inference_mode()
    def neighbours(self, x: torch.Tensor, k: int = 1, *, labels=None, alpha: float | None = None,
                   steps: int | None = None, generator=None) -> torch.Tensor:
        """``k`` debiased KDE neighbours per image: shape ``[B, k, C, H, W]``. ``labels``: each image's
        class index for a class-conditional DKGM; accepted for the common generator interface and
        unused by the unconditional DKGM."""
        if int(k) < 1:
            raise DKGMError(f"k must be >= 1, got {k}")
        y = self._labels(labels, x)
        xk = x.repeat_interleave(int(k), dim=0)
        yk = None if y is None else y.repeat_interleave(int(k))
        return self.sample(xk, alpha, steps, generator, labels=yk).view(x.shape[0], int(k), *x.shape[1:])


def check_knobs(alpha=None, steps=None):
    """Validate the user-facing knobs; returns the one given (for inline use), or both as a tuple.
    ``alpha`` is a noise level in ``[0, 10]`` (images live in ``[-1, 1]``), ``steps`` an integer in
    ``[0, 1000]``."""
    alpha = None if alpha is None else check_float("alpha", alpha, 0.0, ALPHA_MAX)
    steps = None if steps is None else check_int("steps", steps, 0, STEPS_MAX)
    if alpha is not None and steps is not None:
        return alpha, steps
    return alpha if alpha is not None else steps
