"""The one generation path behind every augmentation API.

``DKGMAugment`` (torchvision and albumentations) and ``BalancedDKGMDataset`` all call
:func:`generate`: images in ``[0, 1]`` go in, neighbours come out, each image's noise
drawn from its own seed so that a result does not depend on which batch an image was
generated in.

A generator is an ``nn.Module`` that follows :class:`Generator`; generation itself needs
only its :class:`NeighbourSource` part.
"""
import copy
import warnings
from typing import Protocol, runtime_checkable

import torch

from .checkpoint import load
from .errors import DataError, DKGMError
from .images import check_unit_range, from_model, to_model
from .nn import evaluating

_LUMA = torch.tensor([0.299, 0.587, 0.114])


@runtime_checkable
class NeighbourSource(Protocol):
    """What generation needs: ``channels`` and seeded neighbours of ``[-1, 1]`` images.
    Image ``i``'s result must depend only on ``x[i]``, ``seeds[i]`` and the knobs, not on
    the rest of the batch."""

    channels: int

    def neighbours_from_seeds(self, x, seeds, *, labels=None, alpha=None, steps=None): ...


@runtime_checkable
class Generator(NeighbourSource, Protocol):
    """The generator interface: :class:`dkgm_aug.DKGM`, :class:`dkgm_aug.EVAE`,
    :class:`dkgm_aug.VAE` and :class:`dkgm_aug.KernelSmoothedScore` follow it, and a class
    that does can be registered for checkpoints with :func:`dkgm_aug.checkpoint.register_kind`.

    Images are ``[B, C, H, W]`` floats in ``[-1, 1]``, in and out; ``labels`` (one class label
    per image) is for generators that condition on the class and ignored by the others. Such a
    generator says so: ``conditional`` (with ``num_classes``: labels are class indices, required)
    or ``per_class`` (labels are class values, optional); the transforms and banks read these to
    pass labels, refuse a sample without one, and fingerprint the labels a bank was made with;
    ``alpha`` and ``steps`` default to the model's own knobs. ``neighbours`` returns
    ``[B, k, C, H, W]``, its noise from ``generator``. ``config()`` is JSON-ready, and
    ``from_config(config())`` builds the same model, empty of weights; ``save`` writes a
    checkpoint that :func:`dkgm_aug.load` reads."""

    kind: str

    def neighbours(self, x, k=1, *, labels=None, alpha=None, steps=None, generator=None): ...

    def config(self) -> dict: ...

    @classmethod
    def from_config(cls, cfg: dict): ...

    def save(self, path, **info) -> None: ...

# On CPU a U-Net batch much larger than ~64 28x28 images is slower per image (its
# activations leave the caches: benchmarks/speed.py); GPUs take the whole batch.
CPU_CHUNK_PIXELS = 64 * 28 * 28


def cpu_chunk(height: int, width: int) -> int:
    """Images per generator call on CPU: about ``CPU_CHUNK_PIXELS`` pixels per channel."""
    return max(1, CPU_CHUNK_PIXELS // (height * width))


# Generation time against image side, fashion-mnist-tiny (trained at 28x28), batch 1, one CPU
# thread: 28 px 0.035 s, 56 px 0.093 s, 112 px 0.37 s, 224 px 3.1 s, 448 px 34 s -- the
# self-attention grows with the square of the pixel count. So past 16x the training pixels
# (4x the side) a call warns, and past 64x (8x the side, seconds per image) it is refused.
WARN_PIXELS, MAX_PIXELS = 16, 64


def check_image_size(model, height: int, width: int) -> None:
    """Refuse images far larger than the generator's ``image_size`` (generators without one: no check)."""
    size = getattr(model, "image_size", None)
    if size is None:
        return
    h0, w0 = size if isinstance(size, (tuple, list)) else (size, size)
    ratio = height * width / (h0 * w0)
    if ratio > MAX_PIXELS:
        raise DataError(
            f"images of {height}x{width} have {ratio:.0f}x the pixels of the generator's {h0}x{w0} training size "
            f"(at most {MAX_PIXELS}x is taken: time grows with the square of the pixel count, 34 s for one 448x448 "
            f"image with a 28x28 generator on one CPU thread); resize first, e.g. v2.Resize(({h0}, {w0})) before "
            f"DKGMAugment and v2.Resize(({height}, {width})) after it, or use a generator trained near this size")
    if ratio > WARN_PIXELS:
        warnings.warn(f"images of {height}x{width} have {ratio:.0f}x the pixels of the generator's {h0}x{w0} "
                      "training size: generation is slow and the generator never saw images this large; "
                      f"consider resizing to about {h0}x{w0}", stacklevel=3)


def load_generator(spec, device=None):
    """A generator from a shipped name, a checkpoint path, or a model object. A model object needs
    only the :class:`NeighbourSource` part of :class:`Generator`: it is used, never saved, and
    never changed: one in train mode is used through an eval-mode copy (taken once: later weight
    updates are not seen), and on another ``device`` a copy is used (the user's object is not moved)."""
    if isinstance(spec, torch.nn.Module):
        if not isinstance(spec, NeighbourSource):
            raise DKGMError(f"{type(spec).__name__} is not a dkgm_aug generator (see dkgm_aug.augment.Generator)")
        if spec.training:      # an eval-mode copy: toggling the user's own model could race with other threads
            model = copy.deepcopy(spec).eval()
        elif device is None or same_device(model_device(spec), device):
            return spec
        else:
            model = copy.deepcopy(spec)
    else:
        model = load(spec).eval()
    return model.to(device) if device is not None else model


def on_device(model, device, given):
    """``model`` on ``device`` (None: where it is). The library's own model is moved; the user's
    object (``model is given``, the ``generator=`` they passed) is copied first, never moved."""
    if device is None or same_device(model_device(model), device):
        return model
    return (copy.deepcopy(model) if model is given else model).to(device)


def same_device(a, b) -> bool:
    """Whether two devices are the same (``cuda`` and ``cuda:0`` are, on a one-GPU machine)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def check_acceleration(dtype, compile, device) -> tuple:
    """The opt-in ``(dtype, compile)`` of generation on ``device``, checked: ``dtype`` is ``None``
    (the generator's own), ``torch.float32`` or ``torch.float16``, and fp16 needs a CUDA device
    (CPUs gain nothing from it: benchmarks/RESULTS.md, section 3)."""
    if dtype is not None and dtype not in (torch.float32, torch.float16):
        raise DKGMError(f"dtype must be None, torch.float32 or torch.float16, got {dtype!r}")
    if dtype == torch.float16 and (device is None or torch.device(device).type != "cuda"):
        raise DKGMError(f"dtype=torch.float16 runs on CUDA only and needs device='cuda' (got device={device}); "
                        "on a CPU leave dtype=None (float32)")
    if not isinstance(compile, bool):
        raise DKGMError(f"compile must be True or False, got {compile!r}")
    return dtype, compile


def accelerate(model, dtype=None, compile: bool = False):
    """``model`` itself, or, when ``dtype`` or ``compile`` is set, a copy cast to ``dtype`` whose
    networks (its child modules: a DKGM's two U-Nets) are compiled in place by ``torch.compile``
    (the model given is never changed). Compilation happens at the first call, and once more at
    the first new batch size (then the batch size is symbolic)."""
    if dtype is None and not compile:
        return model
    if compile and next(model.children(), None) is None:
        raise DKGMError(f"compile=True: {type(model).__name__} has no networks (child modules) to compile")
    fast = copy.deepcopy(model)
    fast = fast.to(dtype) if dtype is not None else fast
    for net in fast.children() if compile else ():
        net.compile()
    return fast


def model_device(model) -> torch.device:
    """Where a generator lives: its first parameter, or its first buffer for
    training-free generators that hold only data (the kernel-smoothed score)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    """The floating dtype a generator computes in: that of its first floating parameter
    (or buffer); ``float32`` when it has none. ``dtype=torch.float16`` (:func:`accelerate`, on a
    GPU) is the library's way to generate in fp16 (benchmarks/RESULTS.md, section 3)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def match_channels(x: torch.Tensor, channels: int, convert: bool) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if not convert:
        raise DataError(f"images have {x.shape[1]} channels but the generator takes {channels}; pass "
                        "convert_channels=True to convert (gray <-> RGB) or use a matching generator")
    if channels == 1 and x.shape[1] == 3:
        return (x * _LUMA.to(x)[None, :, None, None]).sum(1, keepdim=True)
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    raise DataError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")


@torch.inference_mode()
def generate(model, x01: torch.Tensor, seeds, alpha=None, steps=None, convert_channels: bool = False,
             labels=None) -> torch.Tensor:
    """Debiased KDE neighbours of ``x01`` (``[B, C, H, W]`` floats in [0, 1]), one per image,
    on the model's device in the model's dtype; returns ``[B, C, H, W]`` float32 in [0, 1] on
    ``x01``'s device with ``x01``'s channel count. On CPU a large batch runs in chunks of
    :func:`cpu_chunk` images (the same result: each image's noise comes from its own seed)."""
    if x01.ndim != 4:
        raise DataError(f"expected a [B, C, H, W] batch, got shape {tuple(x01.shape)}")
    x01 = check_unit_range(x01)
    if len(seeds) != len(x01):
        raise DKGMError(f"{len(seeds)} seeds for {len(x01)} images")
    check_image_size(model, *x01.shape[-2:])
    device = model_device(model)
    x = to_model(match_channels(x01.to(device, torch.float32), model.channels, convert_channels)).to(model_dtype(model))
    n = cpu_chunk(*x.shape[-2:]) if device.type == "cpu" else len(x)
    try:
        with evaluating(model):     # a user's model in train mode is put back in it
            parts = [model.neighbours_from_seeds(x[i:i + n], seeds[i:i + n], alpha=alpha, steps=steps,
                                                 labels=None if labels is None else labels[i:i + n])
                     for i in range(0, len(x), n)]
    except RuntimeError as exc:   # torch._dynamo's BackendCompilerFailed, e.g. no C++ compiler for a CPU
        if "BackendCompilerFailed" not in (c.__name__ for c in type(exc).__mro__):
            raise
        raise DKGMError(f"compile=True: torch.compile could not compile the generator on {device} "
                        f"({str(exc).strip().splitlines()[0][:300]}); pass compile=False") from exc
    out = from_model((parts[0] if len(parts) == 1 else torch.cat(parts)).float())
    return match_channels(out, x01.shape[1], True).to(x01.device)


def filtered_generate(model, x01: torch.Tensor, seeds, alpha=None, steps=None, convert_channels: bool = False,
                      labels=None, label_filter=None) -> torch.Tensor:
    """:func:`generate`, through ``label_filter`` (a :class:`dkgm_aug.LabelFilter`) when one is given:
    rejected neighbours are redrawn with the next seeds. ``labels`` are the sources' class labels,
    for the filter and for generators that condition on them."""
    if label_filter is None:
        return generate(model, x01, seeds, alpha, steps, convert_channels, labels=labels)

    def make(idx: torch.Tensor, s: list) -> torch.Tensor:      # neighbours of x01[idx] with seeds s
        picked = None if labels is None else [labels[i] for i in idx.tolist()]
        return generate(model, x01[idx], s, alpha, steps, convert_channels, labels=picked)
    return label_filter(make, x01, seeds, labels)
