"""The one place for image conversions: user images <-> [0, 1] floats <-> the model's ``[-1, 1]``.

* ``tensor_unit`` / ``to_uint8``: the dtype rule (uint8, or float in [0, 1] checked by
  ``check_unit_range``) and its inverse; every path below goes through them.
* ``to_unit_float`` / ``source_unit``: one PIL image, numpy HWC array or CHW tensor -> float CHW.
* ``collate_images``: dataset items -> a ``[B, C, H, W]`` batch in [0, 1].
* ``to_unit_hwc``: albumentations' numpy images (uint8 or float32), any layout -> float in [0, 1].
* ``to_batch``: a transform's input (CHW/BCHW tensor, PIL L/RGB, numpy HxW/HxWxC) -> a
  ``[B, C, H, W]`` batch in [0, 1], with ``restore`` back to the input's type, dtype and shape.
* ``to_model`` / ``from_model``: [0, 1] <-> [-1, 1]; ``uint8_to_model``: uint8 -> [-1, 1] in any float dtype.
"""
import warnings

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors

from .errors import DataError

# How far outside [0, 1] a float image may stray and be clamped: float rounding, as left by a
# bilinear Resize (measured 0 with torchvision 0.29, antialias on and off, 16-224 px). A
# bicubic Resize overshoots by up to 0.45 on hard edges, as far as a normalized image goes,
# so that is refused with a hint rather than taken for rounding.
RANGE_TOL = 1e-3
# a uint8 image holding only 0 and 1 is refused from this many values on (an 8x8 image): a few
# pixels of a real image can all be 0 or 1; 64 of them are a binary image.
BINARY_MIN_PIXELS = 64
# images whose brightest pixel is at most this (of 255) look like data on a 0 .. 16 scale read as 8-bit
LOW_PEAK = 16


def check_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Float images ``x`` (any shape) checked to be finite and in [0, 1], clamped to it when within
    ``RANGE_TOL``; the one range check of every path that takes float images."""
    if x.numel() == 0:
        return x
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))   # one pass; NaN and inf show in the extremes
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError("images contain NaN or inf values; check the data (or the transforms before this one)")
    if lo >= 0 and hi <= 1:
        if 0 < hi <= (LOW_PEAK + 0.5) / 255 and x.ndim == 4 and len(x) > 1 and x[0].numel() >= BINARY_MIN_PIXELS:
            _warn_low_peak(f"float images whose values reach only {hi:.4f} (at most {LOW_PEAK}/255)")
        return x
    if lo >= -RANGE_TOL and hi <= 1 + RANGE_TOL:
        return x.clamp(0, 1)
    raise DataError(f"float images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]: {_range_hint(lo, hi)}")


def _range_hint(lo: float, hi: float) -> str:
    if lo >= -0.5 and hi <= 1.5:
        return ("a bicubic Resize of a float image overshoots [0, 1] (by up to ~0.45): add .clamp(0, 1) after it "
                "or resize the uint8 image; if the values were normalized, put DKGMAugment before Normalize")
    if lo < 0:
        return ("negative values: put DKGMAugment before Normalize (it takes images in [0, 1]); "
                "map an image in [-1, 1] with (x + 1) / 2")
    if hi <= LOW_PEAK + 0.5:
        return (f"values up to {hi:g}: sklearn's digits, for one, are on a 0 .. 16 scale; divide by the scale's "
                "maximum (16 there, 255 for 8-bit images)")
    return ("this looks like a [0, 255] image: divide by 255 (or pass it as uint8); on another scale (16-bit: "
            "65535), divide by its maximum")


def _warn_low_peak(what: str) -> None:
    warnings.warn(f"{what}: near-black as read. Data on a 0 .. {LOW_PEAK} scale (sklearn's digits) must be divided by "
                  f"{LOW_PEAK}, not 255 (nor cast to uint8); ignore this if the images are truly this dark",
                  stacklevel=3)


def tensor_unit(x: torch.Tensor, what: str = "images", check: bool = True) -> torch.Tensor:
    """A uint8 tensor (any shape) divided by 255 (refused by :func:`check_not_binary` when an image
    holds only 0 and 1), or a float one range-checked, as float32 in [0, 1]; the one uint8-or-float
    rule. It may share memory with ``x`` (a float32 ``x`` already in range).

    ``check=False`` casts a float ``x`` to float32 as it is, without :func:`check_unit_range` (no
    clamping, no refusal), and a uint8 one without :func:`check_not_binary`: for paths that have
    always taken any floats, and for the library's own uint8 images. Other dtypes are refused either way."""
    if x.dtype == torch.uint8:
        if check:
            check_not_binary(x, what)
        return x.float() / 255.0
    if not x.is_floating_point():
        raise DataError(f"{what} must be uint8 or float in [0, 1], got {x.dtype}")
    return check_unit_range(x.float()) if check else x.float()


def check_not_binary(x: torch.Tensor, what: str = "images") -> None:
    """Refuse uint8 images of which one holds only the values 0 and 1 (and has ``BINARY_MIN_PIXELS``
    values or more): binary images or masks stored as uint8, which the 0 .. 255 reading would make
    near-black. Image by image (the leading axes of a 4-D or larger tensor are the batch), so the
    answer for an image does not depend on the others in its batch."""
    if x.dtype != torch.uint8 or x.ndim < 2:
        return
    per_image = x.reshape(-1, *x.shape[-3:]) if x.ndim >= 4 else x[None]
    if per_image[0].numel() < BINARY_MIN_PIXELS or not len(per_image):
        return
    peaks = per_image.flatten(1).amax(1)
    low = (peaks > 1) & (peaks <= LOW_PEAK)
    if len(peaks) > 1 and bool(low.all()):   # every image of a batch or dataset: a small scale, not one dark image
        _warn_low_peak(f"uint8 {what} whose values reach only {int(peaks.max())} (at most {LOW_PEAK} of 255)")
    if bool((peaks == 1).any()):
        first = int(torch.nonzero(peaks == 1)[0])
        where = f" (image {first} of {len(peaks)})" if len(peaks) > 1 else ""
        raise DataError(f"uint8 {what} hold only the values 0 and 1{where} (binary images or masks?): uint8 is read "
                        "as 0 .. 255, so these would be near-black; multiply by 255 (or pass floats in [0, 1])")


def to_uint8(x01: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] as uint8 in [0, 255], rounded half to even: the inverse of :func:`tensor_unit`."""
    return (x01 * 255).round().to(torch.uint8)


def check_chw(x: torch.Tensor) -> None:
    """Refuse a ``[..., H, W, C]`` tensor given where ``[..., C, H, W]`` is expected (a 28x28x1 image
    would otherwise be read as 28 channels of 28x1)."""
    if x.ndim >= 3 and 1 <= x.shape[-1] <= 4 and x.shape[-3] > 4:
        raise DataError(f"tensor of shape {tuple(x.shape)} looks like HWC (channels last); images must be CHW: "
                        "use .permute(2, 0, 1) (.permute(0, 3, 1, 2) for a batch) or transforms.v2.ToImage()")


def _own_tensor(arr: np.ndarray) -> torch.Tensor:
    # a C-order copy: never aliases the caller's array, and takes read-only (PIL's) and flipped arrays
    return torch.from_numpy(arr.copy())


def _with_channels(hw):
    """An HxW image (array or tensor) as HxWx1; HxWxC ones as they are."""
    return hw[..., None] if hw.ndim == 2 else hw


def to_unit_float(img) -> torch.Tensor:
    """A PIL image, numpy HWC array or CHW tensor (uint8, or float in [0, 1]) as a float32 CHW tensor in [0, 1];
    a PIL image in a mode other than L, RGB, I or F goes through :func:`source_unit`'s conversion."""
    if isinstance(img, torch.Tensor):
        check_chw(img)
        x = img
    elif isinstance(img, np.ndarray):
        x = _own_tensor(_with_channels(img)).permute(2, 0, 1)
    elif hasattr(img, "mode") and hasattr(img, "size"):   # PIL, or anything that looks like it
        # palette indices, YCbCr planes, 16-bit values: not gray or RGB as read. 32-bit integer ("I") and
        # float ("F") images keep their values (refused, and range-checked): their scale is not known.
        if img.mode not in ("L", "RGB", "I", "F"):
            return source_unit(img)
        x = _own_tensor(_with_channels(np.asarray(img))).permute(2, 0, 1)
    else:
        raise DataError(f"cannot read an image from {type(img).__name__}; give a PIL image, numpy array or tensor")
    return tensor_unit(x)


WIDE_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def pil_8bit(im, where: str = ""):
    """A PIL image in an 8-bit mode: 16-bit and 32-bit integer images (I;16, I) scaled from [0, 65535],
    float ones (F) from [0, 1] (PIL's own ``convert`` clips them to 255 or cuts them to 0); others as they are."""
    if getattr(im, "mode", None) not in WIDE_MODES:
        return im
    from PIL import Image
    a, hi = np.asarray(im).astype(np.float64), WIDE_MODES[im.mode]
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > hi:
        raise DataError(f"{where or 'image'}: a mode {im.mode} image must hold values in [0, {hi:g}], got "
                        f"{a.min():g} .. {a.max():g}")
    return Image.fromarray(np.round(a / hi * 255).astype(np.uint8))


def from_8bit(out, mode: str):
    """The 8-bit PIL image ``out`` in ``mode``, the inverse of :func:`pil_8bit` for the wide modes."""
    from PIL import Image
    if mode in WIDE_MODES:
        a = np.asarray(out.convert("L")).astype(np.float64) / 255 * WIDE_MODES[mode]
        return Image.fromarray(a.astype(np.float32)) if mode == "F" else \
            Image.fromarray(np.round(a).astype(np.uint16 if mode.startswith("I;16") else np.int32))
    return out.convert(mode)


def source_unit(image) -> torch.Tensor:
    """A source image as the generator takes it: float CHW in [0, 1]. The model sees gray or
    RGB; other PIL modes go through those: 16-bit, 32-bit and float gray scaled to 8 bits
    (:func:`pil_8bit`), palette, alpha and 1-bit converted."""
    if not isinstance(image, (torch.Tensor, np.ndarray)) and getattr(image, "mode", "L") not in ("L", "RGB"):
        image = pil_8bit(image)
        if image.mode == "La":             # premultiplied alpha: PIL converts it to LA only
            image = image.convert("LA")
        if image.mode not in ("L", "RGB"):
            image = image.convert("L" if image.mode in ("1", "LA") else "RGB")
    return to_unit_float(image)


def collate_images(items) -> torch.Tensor:
    """Collate dataset items (``image`` or ``(image, label, ...)``) into a ``[B, C, H, W]`` batch in [0, 1]."""
    imgs = [to_unit_float(it[0] if isinstance(it, (tuple, list)) else it) for it in items]
    shapes = {tuple(i.shape) for i in imgs}
    if len(shapes) != 1:
        raise DataError(f"images in a batch have different shapes {sorted(shapes)[:3]}; resize them first")
    return torch.stack(imgs)


def to_unit_hwc(img) -> torch.Tensor:
    """A numpy image or batch, albumentations' kind (uint8, or float32 in [0, 1]), as float32 in [0, 1], same layout."""
    if not isinstance(img, np.ndarray) or img.size == 0:
        got = getattr(img, "shape", type(img).__name__)
        raise DataError(f"expected a non-empty numpy HxW or HxWxC image, got {got}")
    if img.dtype not in (np.uint8, np.float32):
        raise DataError(f"images must be uint8 or float32 in [0, 1], got {img.dtype}")
    return tensor_unit(_own_tensor(img))


def to_batch(inpt):
    """``inpt`` as a float32 ``[B, C, H, W]`` batch in [0, 1], and a function ``restore`` that turns such a
    batch back into ``inpt``'s type, dtype, shape and range (``tv_tensors`` stay wrapped); for a tensor,
    ``restore(out, rows)`` takes only the images ``rows`` from ``out`` and returns the others untouched.

    Takes CHW or BCHW tensors (uint8, or float in [0, 1]), PIL images of mode L or RGB, and numpy
    HxW or HxWxC arrays (uint8, or float32 in [0, 1]: :func:`numpy_batch`).

    >>> x01, restore = to_batch(torch.zeros(3, 8, 8, dtype=torch.uint8))
    >>> tuple(x01.shape), restore(x01).dtype
    ((1, 3, 8, 8), torch.uint8)
    """
    if isinstance(inpt, tv_tensors.Video):
        raise DataError("DKGMAugment does not augment a tv_tensors.Video; to give each frame its own "
                        "neighbour, pass the frames as tv_tensors.Image(video.flatten(0, -4))")
    if isinstance(inpt, torch.Tensor):
        return _tensor_batch(inpt)
    if isinstance(inpt, PIL.Image.Image):
        return _pil_batch(inpt)
    if isinstance(inpt, np.ndarray):
        return numpy_batch(inpt)
    raise DataError(f"cannot augment a {type(inpt).__name__}; give a PIL image, a tensor or a numpy array")


def _tensor_batch(inpt: torch.Tensor):
    if inpt.ndim not in (3, 4):
        raise DataError(f"tensor images must be CHW or BCHW, got shape {tuple(inpt.shape)}")
    if min(inpt.shape[-2:]) == 0 or (inpt.ndim == 4 and inpt.shape[0] == 0):
        raise DataError(f"empty image tensor of shape {tuple(inpt.shape)}")
    check_chw(inpt)
    x01 = tensor_unit(inpt if inpt.ndim == 4 else inpt[None], what="tensor images")

    def restore(out, rows=None):
        """``rows`` (indices of the images that changed): the others come back as given, bit for bit
        (a float64 image through float32 would be rounded, a near-range one clamped)."""
        if rows is not None and inpt.dtype != torch.uint8:
            y = (inpt if inpt.ndim == 4 else inpt[None]).clone()
            y[rows] = out[rows].to(device=y.device, dtype=y.dtype)
        else:
            y = to_uint8(out) if inpt.dtype == torch.uint8 else out.to(inpt.dtype)
        y = y if inpt.ndim == 4 else y[0]
        return tv_tensors.wrap(y, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else y
    return x01, restore


def _pil_batch(inpt: PIL.Image.Image):
    if inpt.mode not in ("L", "RGB"):
        raise DataError(f"PIL images must be mode 'L' or 'RGB', got {inpt.mode!r}; call .convert('RGB')")

    def restore(out, rows=None):    # one image: the caller returns the input itself when it is unchanged
        arr = to_uint8(out[0]).permute(1, 2, 0).cpu().numpy()
        return PIL.Image.fromarray(arr[..., 0] if inpt.mode == "L" else arr, mode=inpt.mode)
    return to_unit_float(inpt)[None], restore


def numpy_batch(img: np.ndarray):
    """:func:`to_batch` for one numpy HxW or HxWxC image (uint8, or float32 in [0, 1]), albumentations' kind."""
    x01 = to_unit_hwc(img)
    if img.ndim not in (2, 3):
        raise DataError(f"expected a numpy HxW or HxWxC image, got shape {img.shape}")

    def restore(out, rows=None):    # one image, as above
        y = out[0].permute(1, 2, 0).cpu()
        y = y[..., 0] if img.ndim == 2 else y
        return to_uint8(y).numpy() if img.dtype == np.uint8 else y.numpy().astype(np.float32)
    return _with_channels(x01).permute(2, 0, 1)[None], restore


def to_model(x01: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] as the model's [-1, 1] (``x01 * 2 - 1``), same dtype and device."""
    return x01 * 2 - 1


def from_model(x: torch.Tensor) -> torch.Tensor:
    """The model's [-1, 1] as floats in [0, 1] (``(x + 1) / 2``, clamped), same dtype and device."""
    return ((x + 1) / 2).clamp(0, 1)


def uint8_to_model(q: torch.Tensor, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """uint8 images (any shape) straight to the model's [-1, 1] as ``dtype`` on ``device`` (default: ``q``'s),
    computed there as ``q / 127.5 - 1``. In float32 on the CPU that is ``to_model(tensor_unit(q))`` bit for
    bit, in one pass; :func:`from_model` then :func:`to_uint8` gives ``q`` back."""
    if q.dtype != torch.uint8:
        raise DataError(f"expected uint8 images, got {q.dtype}")
    return q.to(device=device, dtype=dtype) / 127.5 - 1
