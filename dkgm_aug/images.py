"""Conversions at the library's edges: user images <-> the model's ``[-1, 1]`` floats."""
import numpy as np
import torch

from .errors import DataError

# How far outside [0, 1] a float image may stray and be clamped: float rounding, as left by a
# bilinear Resize (measured 0 with torchvision 0.29, antialias on and off, 16-224 px). A
# bicubic Resize overshoots by up to 0.45 on hard edges, as far as a normalized image goes,
# so that is refused with a hint rather than taken for rounding.
RANGE_TOL = 1e-3


def check_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Float images ``x`` (any shape) checked to be finite and in [0, 1], clamped to it when within
    ``RANGE_TOL``; the one range check of every path that takes float images."""
    if x.numel() == 0:
        return x
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))   # one pass; NaN and inf show in the extremes
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError("images contain NaN or inf values; check the data (or the transforms before this one)")
    if lo >= 0 and hi <= 1:
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
    return "this looks like a [0, 255] image: divide by 255 (or pass it as uint8)"


def check_chw(x: torch.Tensor) -> None:
    """Refuse a ``[..., H, W, C]`` tensor given where ``[..., C, H, W]`` is expected (a 28x28x1 image
    would otherwise be read as 28 channels of 28x1)."""
    if x.ndim >= 3 and 1 <= x.shape[-1] <= 4 and x.shape[-3] > 4:
        raise DataError(f"tensor of shape {tuple(x.shape)} looks like HWC (channels last); images must be CHW: "
                        "use .permute(2, 0, 1) (.permute(0, 3, 1, 2) for a batch) or transforms.v2.ToImage()")


def to_unit_float(img) -> torch.Tensor:
    """A PIL image, numpy HWC array or CHW tensor (uint8, or float in [0, 1]) as a float32 CHW tensor in [0, 1]."""
    if isinstance(img, torch.Tensor):
        check_chw(img)
        x = img
    elif isinstance(img, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(img[..., None] if img.ndim == 2 else img)).permute(2, 0, 1)
    elif hasattr(img, "mode") and hasattr(img, "size"):   # PIL, without importing it here
        arr = np.array(img)   # a copy: PIL's buffer is read-only
        x = torch.from_numpy(np.ascontiguousarray(arr[..., None] if arr.ndim == 2 else arr)).permute(2, 0, 1)
    else:
        raise DataError(f"cannot read an image from {type(img).__name__}; give a PIL image, numpy array or tensor")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise DataError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
    return check_unit_range(x.float())


def source_unit(image) -> torch.Tensor:
    """A source image as the generator takes it: float CHW in [0, 1]. The model sees gray or
    RGB; other PIL modes (palette, alpha, 1-bit, 16-bit) go through those."""
    if not isinstance(image, (torch.Tensor, np.ndarray)) and getattr(image, "mode", "L") not in ("L", "RGB"):
        image = image.convert("L" if image.mode in ("1", "LA", "La", "I", "I;16", "F") else "RGB")
    return to_unit_float(image)


def to_model(x01: torch.Tensor) -> torch.Tensor:
    return x01 * 2 - 1


def from_model(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def collate_images(items) -> torch.Tensor:
    """Collate dataset items (``image`` or ``(image, label, ...)``) into a ``[B, C, H, W]`` batch in [0, 1]."""
    imgs = [to_unit_float(it[0] if isinstance(it, (tuple, list)) else it) for it in items]
    shapes = {tuple(i.shape) for i in imgs}
    if len(shapes) != 1:
        raise DataError(f"images in a batch have different shapes {sorted(shapes)[:3]}; resize them first")
    return torch.stack(imgs)
