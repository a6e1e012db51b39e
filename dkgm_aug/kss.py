"""Kernel-smoothed empirical score: a training-free generator (docs/design.md, section 6).

The model is the training set itself. Images live in ``[-1, 1]`` and are flattened to
vectors of ``D = C * H * W`` values.

Forward process (variance exploding): ``dX = dB``, so ``X_t = X_0 + sqrt(t) * noise``.
Pushed through it, the finite set ``{x_i}`` becomes the Gaussian mixture
``p_t = (1/N) sum_i N(x_i, t I)`` whose score is the *empirical score*::

    s_t(x) = -(x - m_t(x)) / t,   m_t(x) = sum_i w_i(x) x_i,   w = softmax_i(-||x - x_i||^2 / (2 t))

The reverse SDE driven by ``s_t`` can only produce training images (the known
memorisation of the exact empirical score). The *kernel-smoothed* score averages it over
a Gaussian kernel of bandwidth ``h`` in x-space::

    s_t^h(x) = E_xi[ s_t(x + h xi) ] = -(x - E_xi[ m_t(x + h xi) ]) / t,   xi ~ N(0, I)

(the second form uses ``E[xi] = 0``). We estimate the expectation by Monte Carlo with
``n_smooth`` draws of ``xi`` per image and step, averaging only ``m_t`` (the ``h xi``
term has mean 0 and is dropped: same expectation, less variance). ``h = 0`` gives the
exact empirical score. ``h`` is in ``[-1, 1]`` pixel units (per-pixel standard deviation).

Choosing ``h``: what matters is ``h`` against the distance ``d`` between neighbouring
training images, not ``h * sqrt(D)``: near a training image, the kernel moves the nearest
neighbour only along the (nearly orthogonal to ``xi``) directions between images, with
probability about ``Phi(-d / 2h)``. Memorisation fades around ``h ~ d / 4`` and larger ``h``
pulls samples toward blurry local averages (benchmarks/results/kss_memorisation.md:
Fashion-MNIST, ``d ~ 7.8``: 93% copies at ``h = 1``, 46% at 1.5, 12% at 2, blurry at 3+).
The default ``h = 1`` is only a starting point.

Reverse process, our choices (the paper fixes none of them):

* Reverse SDE of ``dX = dB`` (drift ``f = 0``, diffusion ``g = 1``): in reverse time
  ``tau = T - t`` it is ``dX = g^2 s_t(X) dtau + g dW``, so one Euler-Maruyama step from
  ``t`` down to ``t' < t`` is::

      X_{t'} = X_t + (t - t') * s_t^h(X_t) + sqrt(t - t') * z,   z ~ N(0, I)

  The last step adds no noise.
* Time grid: geometric, ``steps`` steps from the start time down to ``t_min``
  (``t_k = t_start * (t_min / t_start) ** (k / steps)``), so every step shrinks ``t`` by
  the same factor.
* Unconditional generation (:meth:`KernelSmoothedScore.sample`): start at
  ``T = sigma_max ** 2`` from ``mean(set) + sqrt(T) * noise`` (``p_T`` is close to that
  Gaussian when ``sigma_max`` is at least the diameter of the set). By default
  ``sigma_max = 2 * max_i ||x_i - mean||``, an upper bound of the largest pairwise distance.
* Neighbours of an image ``x`` (the augmentation interface, SDEdit-style): start at
  ``t0 = alpha ** 2`` from ``x + alpha * noise`` and run the reverse SDE down to
  ``min(t_min, t0 / 10)`` in ``steps`` steps. ``alpha`` is thus the noise level in
  ``[-1, 1]`` pixel units, like DKGM's ``alpha`` (default 0.5); ``alpha = 0`` returns ``x``.
* Per class: a model built with ``labels`` runs each image's reverse process with the
  training images of that image's class only (``labels=`` given per call as class label
  values); without labels, or when a call passes none, the whole set is used.
* Outputs are clamped to ``[-1, 1]``; the process itself is not.

Memory: the set is visited in chunks of ``chunk_size`` reference images with a streaming
log-sum-exp softmax, so only ``[rows, chunk_size]`` weights and ``[rows, D]`` running sums
exist at once (``rows = batch * n_smooth``), never ``[batch, N, D]``.

Randomness: image ``i`` of :meth:`neighbours_from_seeds` draws all its noise (start,
smoothing, steps) from ``torch.Generator().manual_seed(seeds[i])`` in a fixed order, so
its result does not depend on the batch it was made in.

Example::

    ds = dkgm_aug.data.digits("train")
    model = KernelSmoothedScore(ds.images, ds.targets, h=0.5)
    x_new = model.neighbours_from_seeds(x, seeds=[0, 1], labels=[3, 7])   # x in [-1, 1]
    fresh = model.sample(16, labels=3, seeds=range(16))
    model.save("kss-digits.safetensors")                                  # dkgm_aug.load reads it
    memorisation(fresh, ds.images)        # share of samples that copy a training image
"""
import math
import numbers

import numpy as np
import torch
from torch import nn

from .dkgm import check_images, check_knobs
from .errors import DataError, DKGMError
from .kernels import randn

MAX_ELEMENTS = 2 ** 34          # N * C * H * W upper bound accepted from a config
CACHE_ELEMENTS = 2 ** 26        # float copies of the set kept per device/dtype (256 MiB in float32)


# ---------------------------------------------------------------------------------------------
# Streaming kernels
# ---------------------------------------------------------------------------------------------
def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataError(f"{name} is empty: shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1)
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    if not x.is_floating_point():
        raise DataError(f"{name} must be a float tensor (or uint8 images), got {x.dtype}")
    return x


def _check_chunk(chunk_size) -> int:
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
            or not 1 <= chunk_size <= 2 ** 24):
        raise DKGMError(f"chunk_size must be an integer in [1, 2**24], got {chunk_size!r}")
    return int(chunk_size)


def _tensor_chunks(ref: torch.Tensor, chunk_size: int):
    """``(ref_chunk [n, D], half squared norms [n])`` for a float reference matrix."""
    for a in range(0, ref.shape[0], chunk_size):
        r = ref[a:a + chunk_size]
        yield r, 0.5 * r.pow(2).sum(1)


def _posterior_mean(y: torch.Tensor, chunks, t: float) -> torch.Tensor:
    """``m_t(y) = sum_i softmax_i(-||y - x_i||^2 / 2t) x_i`` for rows ``y [R, D]``, streaming over
    ``chunks`` of the reference set with a running log-sum-exp. ``-||y - x_i||^2 / 2t`` is
    computed as ``(y . x_i - ||x_i||^2 / 2) / t`` (the dropped ``||y||^2`` is constant per row)."""
    run_max = run_sum = acc = None
    for ref, half in chunks:
        logits = (y @ ref.T - half) / t                                  # [R, chunk]
        cmax = logits.amax(1)
        if run_max is None:
            new_max = cmax
        else:
            new_max = torch.maximum(run_max, cmax)
        p = torch.exp(logits - new_max[:, None])
        if run_max is None:
            run_sum, acc = p.sum(1), p @ ref
        else:
            scale = torch.exp(run_max - new_max)
            run_sum = run_sum * scale + p.sum(1)
            acc = acc * scale[:, None] + p @ ref
        run_max = new_max
    if run_max is None:
        raise DataError("the reference set is empty")
    return acc / run_sum[:, None]


def _smoothed_mean(x: torch.Tensor, chunks_fn, t: float, h: float, xi) -> torch.Tensor:
    """``mean_s m_t(x + h xi_s)`` with ``xi [B, S, D]`` (or ``m_t(x)`` when ``h == 0``)."""
    if h == 0 or xi is None:
        return _posterior_mean(x, chunks_fn(), t)
    b, s, d = xi.shape
    y = (x[:, None, :] + h * xi).reshape(b * s, d)
    return _posterior_mean(y, chunks_fn(), t).view(b, s, d).mean(1)


def _check_t(t) -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 < t < float("inf"):
        raise DKGMError(f"t must be a finite number > 0, got {t!r}")
    return float(t)


def _check_h(h) -> float:
    if isinstance(h, bool) or not isinstance(h, numbers.Real) or not 0 <= h < float("inf"):
        raise DKGMError(f"h (smoothing bandwidth) must be a finite number >= 0, got {h!r}")
    return float(h)


def empirical_score(x: torch.Tensor, ref: torch.Tensor, t: float, *, chunk_size: int = 4096) -> torch.Tensor:
    """Exact score ``-(x - m_t(x)) / t`` of the mixture ``(1/N) sum_i N(x_i, t I)``.

    ``x`` is ``[B, ...]``, ``ref`` ``[N, ...]`` with the same number of values per item
    (floats in one space, or uint8 images, read as ``[-1, 1]``). Returns ``x``'s shape."""
    t, chunk_size = _check_t(t), _check_chunk(chunk_size)
    xf, rf = _flat(x, "x"), _flat(ref, "ref").to(x.device)
    rf = rf.to(xf.dtype)
    if xf.shape[1] != rf.shape[1]:
        raise DataError(f"x has {xf.shape[1]} values per item, ref {rf.shape[1]}")
    m = _posterior_mean(xf, _tensor_chunks(rf, chunk_size), t)
    return ((m - xf) / t).view(x.shape)


def smoothed_score(x: torch.Tensor, ref: torch.Tensor, t: float, h: float, *, n_smooth: int = 8,
                   generator=None, xi=None, chunk_size: int = 4096) -> torch.Tensor:
    """Monte Carlo kernel-smoothed score ``-(x - mean_s m_t(x + h xi_s)) / t``, ``xi_s ~ N(0, I)``.

    ``xi`` (``[B, n_smooth, D]``) may be given; else it is drawn from ``generator``.
    ``h = 0`` is the exact :func:`empirical_score`."""
    t, h, chunk_size = _check_t(t), _check_h(h), _check_chunk(chunk_size)
    xf, rf = _flat(x, "x"), _flat(ref, "ref").to(x.device)
    rf = rf.to(xf.dtype)
    if xf.shape[1] != rf.shape[1]:
        raise DataError(f"x has {xf.shape[1]} values per item, ref {rf.shape[1]}")
    if h > 0 and xi is None:
        _check_n_smooth(n_smooth)
        xi = randn((xf.shape[0], int(n_smooth), xf.shape[1]), generator, xf.device, xf.dtype)
    if xi is not None and (xi.ndim != 3 or xi.shape[0] != xf.shape[0] or xi.shape[2] != xf.shape[1]):
        raise DKGMError(f"xi must have shape [B, S, D] = [{xf.shape[0]}, S, {xf.shape[1]}], got {tuple(xi.shape)}")
    m = _smoothed_mean(xf, lambda: _tensor_chunks(rf, chunk_size), t, h, None if h == 0 else xi.to(xf))
    return ((m - xf) / t).view(x.shape)


def _check_n_smooth(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= 4096:
        raise DKGMError(f"n_smooth must be an integer in [1, 4096], got {n!r}")
    return int(n)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= 100_000:
        raise DKGMError(f"steps must be an integer in [1, 100000] for the kernel-smoothed score, got {steps!r}")
    return int(steps)


def time_grid(t_start: float, t_end: float, steps: int) -> list:
    """Geometric grid ``t_start = t_0 > ... > t_steps = t_end``."""
    return [t_start * (t_end / t_start) ** (k / steps) for k in range(steps + 1)]


# ---------------------------------------------------------------------------------------------
# Memorisation metric
# ---------------------------------------------------------------------------------------------
def nearest_neighbour_distances(samples: torch.Tensor, train: torch.Tensor, k: int = 2, *,
                                chunk_size: int = 4096):
    """Euclidean distances ``[B, k]`` (ascending) and indices ``[B, k]`` of each sample's ``k``
    nearest training items, in float64, streaming over ``train`` in chunks. Both are
    ``[N, ...]`` with the same values per item; uint8 images are read as ``[-1, 1]``."""
    chunk_size = _check_chunk(chunk_size)
    s = _flat(samples, "samples").double()
    tr = train.reshape(train.shape[0], -1) if isinstance(train, torch.Tensor) and train.ndim >= 1 else train
    if not isinstance(tr, torch.Tensor) or tr.shape[0] == 0:
        raise DataError("train is empty")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= tr.shape[0]:
        raise DKGMError(f"k must be an integer in [1, {tr.shape[0]}] (the training set size), got {k!r}")
    if tr.shape[1] != s.shape[1]:
        raise DataError(f"samples have {s.shape[1]} values per item, train {tr.shape[1]}")
    s = s.to(tr.device)
    s_sq = s.pow(2).sum(1, keepdim=True)
    best_d = best_i = None
    for a in range(0, tr.shape[0], chunk_size):
        r = _flat(tr[a:a + chunk_size], "train").double()
        d2 = (s_sq - 2 * s @ r.T + r.pow(2).sum(1)[None]).clamp_min(0)
        idx = torch.arange(a, a + r.shape[0], device=s.device).expand_as(d2)
        if best_d is not None:
            d2, idx = torch.cat([best_d, d2], 1), torch.cat([best_i, idx], 1)
        kk = min(int(k), d2.shape[1])
        best_d, pos = d2.topk(kk, dim=1, largest=False)
        best_i = idx.gather(1, pos)
    return best_d.sqrt(), best_i


def memorisation(samples: torch.Tensor, train: torch.Tensor, ratio: float = 1 / 3, *,
                 chunk_size: int = 4096) -> float:
    """Share of samples whose nearest training item is closer than ``ratio`` times the
    distance to the second nearest (the kernel-smoothed score paper's memorisation criterion). The mean
    nearest-neighbour distance (novelty) is ``nearest_neighbour_distances(...)[0][:, 0].mean()``."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
        raise DKGMError(f"ratio must be in (0, 1], got {ratio!r}")
    if isinstance(train, torch.Tensor) and train.ndim >= 1 and train.shape[0] < 2:
        raise DataError("memorisation needs at least 2 training items (nearest and second nearest)")
    d, _ = nearest_neighbour_distances(samples, train, 2, chunk_size=chunk_size)
    return float((d[:, 0] < ratio * d[:, 1]).double().mean())


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------
def _label_value(y):
    """A class label as a plain int or str (0-d tensors and numpy scalars included)."""
    if isinstance(y, torch.Tensor):
        if y.numel() != 1:
            raise DataError(f"a label must be a single value, got a tensor of shape {tuple(y.shape)}")
        y = y.item()
    elif isinstance(y, (np.generic, np.ndarray)):
        if np.size(y) != 1:
            raise DataError(f"a label must be a single value, got an array of shape {np.shape(y)}")
        y = y.item()
    if isinstance(y, bool) or not isinstance(y, (numbers.Integral, str)):
        raise DataError(f"class labels must be integers or strings, got {y!r} ({type(y).__name__})")
    return int(y) if isinstance(y, numbers.Integral) else y


def _encode_labels(labels, n: int):
    if isinstance(labels, torch.Tensor):
        labels = labels.reshape(-1).tolist() if labels.ndim <= 1 else labels
    elif isinstance(labels, np.ndarray):
        labels = labels.tolist() if labels.ndim <= 1 else labels
    if not isinstance(labels, (list, tuple)):
        raise DataError(f"labels must be a 1-d sequence of class labels (one per image), got "
                        f"{type(labels).__name__} of shape {getattr(labels, 'shape', '?')}")
    if len(labels) != n:
        raise DataError(f"{n} images but {len(labels)} labels")
    values = [_label_value(v) for v in labels]
    if len({type(v) for v in values}) > 1:
        raise DataError("labels must be all integers or all strings")
    classes = sorted(set(values))
    index = {c: k for k, c in enumerate(classes)}
    return classes, torch.tensor([index[v] for v in values], dtype=torch.int64)


def _as_images(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise DataError(f"images must be a uint8 tensor or array [N, C, H, W], got {type(images).__name__}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise DataError(f"images must have shape [N, C, H, W] (or [N, H, W]), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise DataError(f"images must be uint8 (0..255), got {images.dtype}; convert with (x * 255).round()")
    if 0 in images.shape:
        raise DataError(f"the image set is empty: shape {tuple(images.shape)}")
    return images


class KernelSmoothedScore(nn.Module):
    """Training-free generator: the reverse SDE of the kernel-smoothed empirical score of
    the stored images (see the module docstring for every choice).

    ``images``: uint8 ``[N, C, H, W]`` (or ``[N, H, W]``); ``labels``: one class label per
    image (ints or strings) or None. Knobs: ``h`` (smoothing bandwidth, ``[-1, 1]`` pixel
    units; 0 = exact empirical score, which memorises; the module docstring says how to
    choose it), ``sigma_max`` (start noise of :meth:`sample`; None: ``2 * max ||x_i - mean||``),
    ``t_min`` (end time), ``steps`` (reverse steps), ``alpha`` (neighbour noise level,
    ``t0 = alpha**2``), ``n_smooth`` (Monte Carlo draws of the kernel per image and step),
    ``chunk_size`` (reference images per chunk).
    """

    kind = "kss"

    def __init__(self, images, labels=None, *, h: float = 1.0, sigma_max: float | None = None,
                 t_min: float = 1e-3, steps: int = 50, alpha: float = 0.5, n_smooth: int = 8,
                 chunk_size: int = 4096, info: dict | None = None):
        super().__init__()
        images = _as_images(images)
        classes, codes = (None, None) if labels is None else _encode_labels(labels, images.shape[0])
        if sigma_max is None:
            sigma_max = 2 * self._radius(images, _check_chunk(chunk_size))
            sigma_max = max(sigma_max, 1e-3)
        self._setup(images.shape, classes, h=h, sigma_max=sigma_max, t_min=t_min, steps=steps, alpha=alpha,
                    n_smooth=n_smooth, chunk_size=chunk_size, info=info)
        with torch.no_grad():
            self.images.copy_(images)
            if codes is not None:
                self.label_codes.copy_(codes)

    @staticmethod
    def _radius(images: torch.Tensor, chunk_size: int) -> float:
        d = images[0].numel()
        total = torch.zeros(d, dtype=torch.float64)
        for a in range(0, len(images), chunk_size):
            total += (images[a:a + chunk_size].reshape(-1, d).double() / 127.5 - 1).sum(0)
        mean = total / len(images)
        r = 0.0
        for a in range(0, len(images), chunk_size):
            x = images[a:a + chunk_size].reshape(-1, d).double() / 127.5 - 1
            r = max(r, float((x - mean).pow(2).sum(1).max().sqrt()))
        return r

    def _setup(self, shape, classes, *, h, sigma_max, t_min, steps, alpha, n_smooth, chunk_size, info):
        n, c, hh, ww = (int(v) for v in shape)
        if n < 1 or c < 1 or hh < 1 or ww < 1 or n * c * hh * ww > MAX_ELEMENTS or max(hh, ww) > 8192:
            raise DKGMError(f"image set shape [N, C, H, W] = {[n, c, hh, ww]} is empty or too large")
        self.h = _check_h(h)
        if isinstance(sigma_max, bool) or not isinstance(sigma_max, numbers.Real) or not 0 < sigma_max < 1e6:
            raise DKGMError(f"sigma_max must be a number in (0, 1e6), got {sigma_max!r}")
        if isinstance(t_min, bool) or not isinstance(t_min, numbers.Real) or not 0 < t_min < sigma_max ** 2:
            raise DKGMError(f"t_min must be a number in (0, sigma_max**2 = {sigma_max ** 2:g}), got {t_min!r}")
        self.sigma_max, self.t_min = float(sigma_max), float(t_min)
        self.steps = _check_steps(steps)
        self.alpha = check_knobs(alpha=alpha)
        self.n_smooth = _check_n_smooth(n_smooth)
        self.chunk_size = _check_chunk(chunk_size)
        if classes is not None:
            if not isinstance(classes, (list, tuple)) or not classes:
                raise DKGMError("classes must be a non-empty list of class labels")
            classes = [_label_value(v) for v in classes]
            if len(set(classes)) != len(classes) or len({type(v) for v in classes}) > 1:
                raise DKGMError("classes must be distinct and all integers or all strings")
            self.classes = list(classes)
            self._class_index = {v: k for k, v in enumerate(self.classes)}
        else:
            self.classes, self._class_index = None, {}
        if not isinstance(info, (dict, type(None))):
            raise DKGMError(f"info must be a dict, got {type(info).__name__}")
        self.info = dict(info or {})
        self.channels, self.image_size, self.n_images = c, (hh, ww), n
        self.register_buffer("images", torch.zeros((n, c, hh, ww), dtype=torch.uint8))
        if self.classes is not None:
            self.register_buffer("label_codes", torch.zeros(n, dtype=torch.int64))
        self._cache = {}

    # -- construction helpers ---------------------------------------------------------------
    @classmethod
    def from_dataset(cls, ds, per_class: bool = True, **knobs) -> "KernelSmoothedScore":
        """From a dataset: ``ds.images`` (uint8) and ``ds.targets`` when present (an
        :class:`~dkgm_aug.data.ImageDataset`), else one pass over ``(image, label)`` items."""
        from .images import to_unit_float
        if isinstance(getattr(ds, "images", None), torch.Tensor) and getattr(ds, "targets", None) is not None:
            images, labels = ds.images, ds.targets
        else:
            items = [ds[i] for i in range(len(ds))]
            if not items:
                raise DataError("the dataset is empty")
            images = torch.stack([(to_unit_float(it[0]) * 255).round().to(torch.uint8) for it in items])
            labels = [it[1] for it in items]
        return cls(images, labels if per_class else None, **knobs)

    def config(self) -> dict:
        return dict(n=self.n_images, channels=self.channels, image_size=list(self.image_size), h=self.h,
                    sigma_max=self.sigma_max, t_min=self.t_min, steps=self.steps, alpha=self.alpha,
                    n_smooth=self.n_smooth, chunk_size=self.chunk_size, has_labels=self.classes is not None,
                    classes=None if self.classes is None else list(self.classes), info=self.info)

    @classmethod
    def from_config(cls, cfg: dict) -> "KernelSmoothedScore":
        """An empty model with the buffers of ``cfg`` (checkpoint loading fills them)."""
        required = {"n", "channels", "image_size", "h", "sigma_max", "t_min", "steps", "alpha", "n_smooth",
                    "chunk_size", "has_labels", "classes"}
        if not isinstance(cfg, dict) or not required <= set(cfg):
            missing = sorted(required - set(cfg)) if isinstance(cfg, dict) else sorted(required)
            raise DKGMError(f"a kss config must be a dict with keys {sorted(required)}; missing {missing}")
        unknown = set(cfg) - required - {"info"}
        if unknown:
            raise DKGMError(f"unknown kss config keys {sorted(unknown)}")
        size = cfg["image_size"]
        ints = [cfg["n"], cfg["channels"]] + (list(size) if isinstance(size, (list, tuple)) else [None])
        if len(ints) != 4 or any(isinstance(v, bool) or not isinstance(v, int) for v in ints):
            raise DKGMError(f"kss config: n, channels and image_size [H, W] must be integers, got "
                            f"{cfg['n']!r}, {cfg['channels']!r}, {size!r}")
        if not isinstance(cfg["has_labels"], bool) or cfg["has_labels"] != (cfg["classes"] is not None):
            raise DKGMError("kss config: has_labels must be a bool that matches whether classes is given")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(ints, cfg["classes"], h=cfg["h"], sigma_max=cfg["sigma_max"], t_min=cfg["t_min"],
                    steps=cfg["steps"], alpha=cfg["alpha"], n_smooth=cfg["n_smooth"],
                    chunk_size=cfg["chunk_size"], info=cfg.get("info"))
        return self

    def save(self, path, **info) -> None:
        from .checkpoint import save
        save(self, path, **info)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._cache = {}
        codes = getattr(self, "label_codes", None)
        if codes is not None and codes.device.type != "meta" and len(codes):
            if int(codes.min()) < 0 or int(codes.max()) >= len(self.classes):
                raise DKGMError(f"label_codes hold values outside [0, {len(self.classes)}): corrupt checkpoint")
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = {}      # DataLoader workers rebuild the float copies; keeps pickles small
        return state

    def _apply(self, fn, *args, **kwargs):
        self._cache = {}          # float copies of the set follow the buffers on their next use
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"n={self.n_images}, channels={self.channels}, image_size={self.image_size}, h={self.h}, "
                f"steps={self.steps}, alpha={self.alpha}, "
                f"classes={None if self.classes is None else len(self.classes)}")

    # -- the reference set ---------------------------------------------------------------------
    def _code(self, label) -> int:
        try:
            value = _label_value(label)
        except DataError as exc:
            raise DKGMError(str(exc)) from None
        if value not in self._class_index:
            shown = self.classes if len(self.classes) <= 20 else self.classes[:20] + ["..."]
            raise DKGMError(f"unknown class label {value!r}: this model holds classes {shown}")
        return self._class_index[value]

    def _codes(self, labels, n: int):
        """Per-image class codes (None entries: whole set) for ``n`` images."""
        if labels is None or self.classes is None:
            return [None] * n
        if isinstance(labels, (torch.Tensor, np.ndarray)) and np.ndim(labels) == 0:
            labels = [labels] * n
        elif isinstance(labels, (int, str, np.generic)):
            labels = [labels] * n
        labels = labels.reshape(-1).tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else list(labels)
        if len(labels) != n:
            raise DKGMError(f"{len(labels)} labels for {n} images")
        return [self._code(v) for v in labels]

    def _members(self, code):
        if code is None:
            return None
        key = ("members", code, self.images.device, self.images._version)
        if key not in self._cache:
            self._cache[key] = torch.nonzero(self.label_codes == code).flatten().to(self.images.device)
        return self._cache[key]

    def _chunks_fn(self, code, device, dtype):
        """A function returning an iterator of ``(ref [n, D] float in [-1, 1], ||ref||^2 / 2)``
        chunks of the set (or of one class), cached as floats when small enough."""
        members = self._members(code)
        n = self.n_images if members is None else len(members)
        d = self.channels * self.image_size[0] * self.image_size[1]
        if n == 0:
            raise DKGMError(f"class {self.classes[code]!r} has no images")
        key = ("ref", code, torch.device(device), dtype, self.images.device, self.images._version)
        if n * d <= CACHE_ELEMENTS:
            if key not in self._cache:
                total = sum(v[0].numel() for k, v in self._cache.items() if k[0] == "ref")
                if total + n * d > CACHE_ELEMENTS:
                    self._cache = {k: v for k, v in self._cache.items() if k[0] != "ref"}
                imgs = self.images.reshape(self.n_images, d)
                imgs = imgs if members is None else imgs[members]
                ref = imgs.to(device=device, dtype=dtype) / 127.5 - 1
                self._cache[key] = (ref, 0.5 * ref.pow(2).sum(1))
            ref, half = self._cache[key]
            cs = self.chunk_size
            return lambda: ((ref[a:a + cs], half[a:a + cs]) for a in range(0, n, cs))

        flat = self.images.reshape(self.n_images, d)

        def stream():
            for a in range(0, n, self.chunk_size):
                rows = flat[a:a + self.chunk_size] if members is None else flat[members[a:a + self.chunk_size]]
                r = rows.to(device=device, dtype=dtype) / 127.5 - 1
                yield r, 0.5 * r.pow(2).sum(1)
        return stream

    def set_mean(self, label=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """Mean image of the set (or of one class), flattened, in ``[-1, 1]``."""
        code = None if label is None or self.classes is None else self._code(label)
        total, count = None, 0
        for r, _ in self._chunks_fn(code, device or self.images.device, dtype)():
            s = r.sum(0)
            total, count = (s if total is None else total + s), count + r.shape[0]
        return total / count

    # -- the reverse SDE ---------------------------------------------------------------------------
    def _reverse(self, x: torch.Tensor, ts, chunks_fn, h: float, draw) -> torch.Tensor:
        """Euler-Maruyama from ``ts[0]`` down to ``ts[-1]``; ``draw(shape)`` gives ``[B, *shape]`` noise."""
        d = x.shape[1]
        last = len(ts) - 2
        for k in range(len(ts) - 1):
            t, dt = ts[k], ts[k] - ts[k + 1]
            xi = draw((self.n_smooth, d)) if h > 0 else None
            m = _smoothed_mean(x, chunks_fn, t, h, xi)
            x = x + (dt / t) * (m - x)                 # + dt * score
            if k < last:
                x = x + math.sqrt(dt) * draw((d,))
        return x

    @staticmethod
    def _drawers(seeds, generator, device, dtype):
        """``draw(idx)(shape) -> [len(idx), *shape]``: per-image seeded generators, or one shared one."""
        if seeds is not None:
            gens = [torch.Generator().manual_seed(int(s) % 2 ** 64) for s in seeds]

            def for_idx(idx):
                return lambda shape: torch.stack([randn(shape, gens[i], device, dtype) for i in idx])
        else:
            def for_idx(idx):
                return lambda shape: randn((len(idx), *shape), generator, device, dtype)
        return for_idx

    def _run(self, start_fn, n, codes, t_start, t_end, steps, h, seeds, generator, device, dtype):
        ts = time_grid(t_start, t_end, steps)
        drawers = self._drawers(seeds, generator, device, dtype)
        d = self.channels * self.image_size[0] * self.image_size[1]
        out = torch.empty(n, d, device=device, dtype=dtype)
        groups = {}
        for i, c in enumerate(codes):
            groups.setdefault(c, []).append(i)
        for code, idx in groups.items():
            draw = drawers(idx)
            chunks_fn = self._chunks_fn(code, device, dtype)
            x0 = start_fn(idx, code, draw)
            out[torch.tensor(idx, device=device)] = self._reverse(x0, ts, chunks_fn, h, draw)
        return out.clamp(-1, 1).view(n, self.channels, *self.image_size)

    def _knobs(self, alpha, steps, h):
        alpha = self.alpha if alpha is None else check_knobs(alpha=alpha)
        steps = self.steps if steps is None else _check_steps(steps)
        h = self.h if h is None else _check_h(h)
        return alpha, steps, h

    def _check_x(self, x):
        check_images(x, self.channels)
        if tuple(x.shape[2:]) != self.image_size:
            raise DataError(f"x has images of size {tuple(x.shape[2:])}, the model holds {self.image_size}; "
                            "resize them first")

    @torch.inference_mode()
    def neighbours_from_seeds(self, x: torch.Tensor, seeds, *, labels=None, alpha: float | None = None,
                              steps: int | None = None, h: float | None = None) -> torch.Tensor:
        """The generator interface: one neighbour per image of ``x`` (``[B, C, H, W]`` in
        ``[-1, 1]``), image ``i``'s noise from ``torch.Generator().manual_seed(seeds[i])``.
        ``labels`` (class label per image) restricts each image to its class's training images."""
        self._check_x(x)
        seeds = list(seeds)
        if len(seeds) != len(x):
            raise DKGMError(f"{len(seeds)} seeds for {len(x)} images")
        return self._neighbours(x, labels, alpha, steps, h, seeds, None)

    @torch.inference_mode()
    def neighbours(self, x: torch.Tensor, k: int = 1, *, labels=None, alpha: float | None = None,
                   steps: int | None = None, generator=None, h: float | None = None) -> torch.Tensor:
        """``k`` neighbours per image: shape ``[B, k, C, H, W]``, noise from ``generator``."""
        self._check_x(x)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise DKGMError(f"k must be an integer >= 1, got {k!r}")
        k = int(k)
        codes = self._codes(labels, len(x))
        xk = x.repeat_interleave(k, dim=0)
        lk = None if labels is None or self.classes is None else [self.classes[c] for c in codes for _ in range(k)]
        out = self._neighbours(xk, lk, alpha, steps, h, None, generator)
        return out.view(x.shape[0], k, *x.shape[1:])

    def _neighbours(self, x, labels, alpha, steps, h, seeds, generator):
        alpha, steps, h = self._knobs(alpha, steps, h)
        codes = self._codes(labels, len(x))
        if alpha == 0:
            return x.clamp(-1, 1).clone()
        flat = x.reshape(len(x), -1)
        t0 = alpha ** 2

        def start(idx, code, draw):
            return flat[torch.tensor(idx, device=x.device)] + alpha * draw((flat.shape[1],))

        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        return self._run(start, len(x), codes, t0, min(self.t_min, t0 / 10), steps, h, seeds, generator,
                         x.device, dtype).to(x.dtype)

    @torch.inference_mode()
    def sample(self, n: int, *, labels=None, seeds=None, generator=None, steps: int | None = None,
               h: float | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
        """``n`` new images ``[n, C, H, W]`` in ``[-1, 1]`` from noise: the reverse SDE from
        ``T = sigma_max**2``, started at ``mean + sqrt(T) * noise``. ``labels``: one class
        label for all, or one per sample (models built with labels); ``seeds``: one per sample
        (batch-independent results), else noise comes from ``generator``."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise DKGMError(f"n must be an integer >= 1, got {n!r}")
        n = int(n)
        if seeds is not None:
            seeds = list(seeds)
            if len(seeds) != n:
                raise DKGMError(f"{len(seeds)} seeds for {n} samples")
        _, steps, h = self._knobs(None, steps, h)
        if labels is not None and self.classes is None:
            raise DKGMError("this model was built without labels; sample(labels=...) needs a per-class model")
        codes = self._codes(labels, n)
        device = torch.device(device) if device is not None else self.images.device
        t_start = self.sigma_max ** 2

        def start(idx, code, draw):
            mean = self.set_mean(None if code is None else self.classes[code], device, dtype)
            return mean[None] + self.sigma_max * draw((mean.shape[0],))

        return self._run(start, n, codes, t_start, self.t_min, steps, h, seeds, generator, device, dtype)


GENERATORS = (KernelSmoothedScore,)
