"""The kernel-smoothed score generator: a stored image set and the reverse SDE of its
kernel-smoothed empirical score (:mod:`dkgm_aug.kss.score`).

Our choices on top of the score maths:

* Unconditional generation (:meth:`KernelSmoothedScore.sample`): start at
  ``T = sigma_max ** 2`` from ``mean(set) + sqrt(T) * noise`` (``p_T`` is close to that
  Gaussian when ``sigma_max`` is at least the diameter of the set), down to ``t_min``. By
  default ``sigma_max = 2 * max_i ||x_i - mean||``, an upper bound of the largest pairwise distance.
* Neighbours of an image ``x`` (the augmentation interface, SDEdit-style): start at
  ``t0 = alpha ** 2`` from ``x + alpha * noise`` and run the reverse SDE down to
  ``min(t_min, t0 / 10)`` in ``steps`` steps. ``alpha`` is thus the noise level in
  ``[-1, 1]`` pixel units, like DKGM's ``alpha`` (default 0.5); ``alpha = 0`` returns ``x``.
* Per class: a model built with ``labels`` runs each image's reverse process with the
  training images of that image's class only (``labels=`` given per call as class label
  values); without labels, or when a call passes none, the whole set is used.
* Outputs are clamped to ``[-1, 1]``; the process itself is not.
* Randomness: image ``i`` of :meth:`~KernelSmoothedScore.neighbours_from_seeds` draws all its
  noise (start, smoothing, steps) from ``torch.Generator().manual_seed(seeds[i])`` in a fixed
  order, so its result does not depend on the batch it was made in.
"""
import torch
from torch import nn

from .._validate import check_int
from ..checkpoint import register_kind
from ..dkgm import check_images, check_knobs
from ..errors import DataError, DKGMError
from ..metrics import check_chunk
from .device_cache import class_members, reference_chunks, stamp
from .labels import as_images, check_classes, encode_labels, label_value, per_image
from .score import (check_h, check_n_smooth, check_positive, check_steps, noise_drawers, reverse_sde,
                    set_radius, time_grid)

MAX_ELEMENTS = 2 ** 34          # N * C * H * W upper bound accepted from a config
_CONFIG_KEYS = {"n", "channels", "image_size", "h", "sigma_max", "t_min", "steps", "alpha", "n_smooth",
                "chunk_size", "has_labels", "classes"}


@register_kind
class KernelSmoothedScore(nn.Module):
    """Training-free generator: the reverse SDE of the kernel-smoothed empirical score of
    the stored images (see :mod:`dkgm_aug.kss.score` and this module's docstring for every choice).

    ``images``: uint8 ``[N, C, H, W]`` (or ``[N, H, W]``); ``labels``: one class label per
    image (ints or strings) or None. Knobs: ``h`` (smoothing bandwidth, ``[-1, 1]`` pixel
    units; 0 = exact empirical score, which memorises; :mod:`dkgm_aug.kss.score` says how to
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
        images = as_images(images)
        classes, codes = (None, None) if labels is None else encode_labels(labels, images.shape[0])
        if sigma_max is None:
            sigma_max = max(2 * set_radius(images, check_chunk(chunk_size)), 1e-3)
        self._setup(images.shape, classes, h=h, sigma_max=sigma_max, t_min=t_min, steps=steps, alpha=alpha,
                    n_smooth=n_smooth, chunk_size=chunk_size, info=info)
        with torch.no_grad():
            self.images.copy_(images)
            if codes is not None:
                self.label_codes.copy_(codes)

    def _setup(self, shape, classes, *, h, sigma_max, t_min, steps, alpha, n_smooth, chunk_size, info):
        """Check the knobs and register empty buffers of ``shape`` (the constructor or a
        checkpoint fills them)."""
        n, c, hh, ww = (int(v) for v in shape)
        if n < 1 or c < 1 or hh < 1 or ww < 1 or n * c * hh * ww > MAX_ELEMENTS or max(hh, ww) > 8192:
            raise DKGMError(f"image set shape [N, C, H, W] = {[n, c, hh, ww]} is empty or too large")
        self.h = check_h(h)
        self.sigma_max = check_positive("sigma_max", sigma_max, 1e6)
        self.t_min = check_positive("t_min", t_min, self.sigma_max ** 2)
        self.steps = check_steps(steps)
        self.alpha = check_knobs(alpha=alpha)
        self.n_smooth = check_n_smooth(n_smooth)
        self.chunk_size = check_chunk(chunk_size)
        self.classes = None if classes is None else check_classes(classes)
        self._class_index = {} if classes is None else {v: k for k, v in enumerate(self.classes)}
        if not isinstance(info, (dict, type(None))):
            raise DKGMError(f"info must be a dict, got {type(info).__name__}")
        self.info = dict(info or {})
        self.channels, self.image_size, self.n_images = c, (hh, ww), n
        self.register_buffer("images", torch.zeros((n, c, hh, ww), dtype=torch.uint8))
        if self.classes is not None:
            self.register_buffer("label_codes", torch.zeros(n, dtype=torch.int64))
        self._cache = {}

    # -- construction and checkpoints -------------------------------------------------------
    @classmethod
    def from_dataset(cls, ds, per_class: bool = True, **knobs) -> "KernelSmoothedScore":
        """From a dataset: ``ds.images`` (uint8) and ``ds.targets`` when present and served as they are
        (an :class:`~dkgm_aug.data.ImageDataset` without a transform), else one pass over
        ``(image, label)`` items."""
        from ..data import stored_tensors
        from ..images import to_uint8, to_unit_float
        stored = stored_tensors(ds)
        if stored is not None:
            images, labels = stored
        else:
            items = [ds[i] for i in range(len(ds))]
            if not items:
                raise DataError("the dataset is empty")
            images = torch.stack([to_uint8(to_unit_float(it[0])) for it in items])
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
        if not isinstance(cfg, dict) or not _CONFIG_KEYS <= set(cfg):
            missing = sorted(_CONFIG_KEYS - set(cfg)) if isinstance(cfg, dict) else sorted(_CONFIG_KEYS)
            raise DKGMError(f"a kss config must be a dict with keys {sorted(_CONFIG_KEYS)}; missing {missing}")
        unknown = set(cfg) - _CONFIG_KEYS - {"info"}
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
        from ..checkpoint import save
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

    def __setattr__(self, name, value):
        if name in ("images", "label_codes"):
            self.__dict__["_cache"] = {}      # a new set: no float copy of the old one may serve it
        super().__setattr__(name, value)

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
            value = label_value(label)
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
        return [self._code(v) for v in per_image(labels, n)]

    def _chunks_fn(self, code, device, dtype):
        """A function returning an iterator of float chunks of the set (or of one class)."""
        members = class_members(self._cache, self.images, getattr(self, "label_codes", None), code)
        if members is not None and len(members) == 0:
            raise DKGMError(f"class {self.classes[code]!r} has no images")
        key = (code, stamp(self.images, getattr(self, "label_codes", None) if code is not None else None))
        return reference_chunks(self._cache, self.images, members, key, self.chunk_size, device, dtype)

    def set_mean(self, label=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """Mean image of the set (or of one class), flattened, in ``[-1, 1]``."""
        code = None if label is None or self.classes is None else self._code(label)
        total, count = None, 0
        for r, _ in self._chunks_fn(code, device or self.images.device, dtype)():
            s = r.sum(0)
            total, count = (s if total is None else total + s), count + r.shape[0]
        return total / count

    # -- generation ----------------------------------------------------------------------------
    def _run(self, start_fn, n, codes, t_start, t_end, steps, h, seeds, generator, device, dtype):
        """The reverse SDE for ``n`` images, one class at a time; ``start_fn(idx, code, draw)``
        gives the start rows of images ``idx``. Returns ``[n, C, H, W]`` clamped to ``[-1, 1]``."""
        ts = time_grid(t_start, t_end, steps)
        drawers = noise_drawers(seeds, generator, device, dtype)
        out = torch.empty(n, self.channels * self.image_size[0] * self.image_size[1], device=device, dtype=dtype)
        groups = {}
        for i, c in enumerate(codes):
            groups.setdefault(c, []).append(i)
        for code, idx in groups.items():
            draw = drawers(idx)
            chunks_fn = self._chunks_fn(code, device, dtype)
            x0 = start_fn(idx, code, draw)
            out[torch.tensor(idx, device=device)] = reverse_sde(x0, ts, chunks_fn, h, self.n_smooth, draw)
        return out.clamp(-1, 1).view(n, self.channels, *self.image_size)

    def _knobs(self, alpha, steps, h):
        alpha = self.alpha if alpha is None else check_knobs(alpha=alpha)
        steps = self.steps if steps is None else check_steps(steps)
        h = self.h if h is None else check_h(h)
        return alpha, steps, h

    def _check_x(self, x):
        check_images(x, self.channels)
        if tuple(x.shape[2:]) != self.image_size:
            raise DataError(f"x has images of size {tuple(x.shape[2:])}, the model holds {self.image_size}; "
                            "resize them first")

    @property
    def per_class(self) -> bool:
        """Built with labels: given an image's class label, its neighbour comes from that class's
        training images (``DKGMAugment`` passes the sample's label; without one, the whole set)."""
        return self.classes is not None

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
        k = check_int("k", k, lo=1)
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
        n = check_int("n", n, lo=1)
        if seeds is not None:
            seeds = list(seeds)
            if len(seeds) != n:
                raise DKGMError(f"{len(seeds)} seeds for {n} samples")
        _, steps, h = self._knobs(None, steps, h)
        if labels is not None and self.classes is None:
            raise DKGMError("this model was built without labels; sample(labels=...) needs a per-class model")
        codes = self._codes(labels, n)
        device = torch.device(device) if device is not None else self.images.device

        def start(idx, code, draw):
            mean = self.set_mean(None if code is None else self.classes[code], device, dtype)
            return mean[None] + self.sigma_max * draw((mean.shape[0],))

        return self._run(start, n, codes, self.sigma_max ** 2, self.t_min, steps, h, seeds, generator,
                         device, dtype)
