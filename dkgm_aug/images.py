"""Conversions at the library's edges: user images <-> the model's ``[-1, 1]`` floats."""
import numpy as np
import torch

from .errors import DataError


def to_unit_float(img) -> torch.Tensor:
    """A PIL image, numpy HWC array or CHW tensor (uint8, or float in [0, 1]) as a float32 CHW tensor in [0, 1]."""
    if isinstance(img, torch.Tensor):
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
    return x.float()


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
