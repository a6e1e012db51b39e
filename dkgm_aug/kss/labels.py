"""Inputs of a kernel-smoothed score model: the uint8 image set and its class labels.

Labels are ints or strings (one kind per set); the model stores them as codes into the
sorted list of distinct labels, so a checkpoint holds an int64 tensor and the class names
in its JSON config.
"""
import numbers

import numpy as np
import torch

from ..errors import DataError, DKGMError


def label_value(y):
    """A class label as a plain int or str (0-d tensors and numpy scalars included)."""
    if isinstance(y, (torch.Tensor, np.generic, np.ndarray)):
        if (y.numel() if isinstance(y, torch.Tensor) else np.size(y)) != 1:
            raise DataError(f"a label must be a single value, got {type(y).__name__} of shape {tuple(y.shape)}")
        y = y.item()
    if isinstance(y, bool) or not isinstance(y, (numbers.Integral, str)):
        raise DataError(f"class labels must be integers or strings, got {y!r} ({type(y).__name__})")
    return int(y) if isinstance(y, numbers.Integral) else y


def encode_labels(labels, n: int):
    """``(classes, codes [n] int64)`` for one label per image."""
    if isinstance(labels, torch.Tensor) and labels.ndim <= 1:
        labels = labels.reshape(-1).tolist()
    elif isinstance(labels, np.ndarray) and labels.ndim <= 1:
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)):
        raise DataError(f"labels must be a 1-d sequence of class labels (one per image), got "
                        f"{type(labels).__name__} of shape {getattr(labels, 'shape', '?')}")
    if len(labels) != n:
        raise DataError(f"{n} images but {len(labels)} labels")
    values = [label_value(v) for v in labels]
    if len({type(v) for v in values}) > 1:
        raise DataError("labels must be all integers or all strings")
    classes = sorted(set(values))
    index = {c: k for k, c in enumerate(classes)}
    return classes, torch.tensor([index[v] for v in values], dtype=torch.int64)


def check_classes(classes) -> list:
    """A config's class list: distinct labels, all ints or all strings."""
    if not isinstance(classes, (list, tuple)) or not classes:
        raise DKGMError("classes must be a non-empty list of class labels")
    classes = [label_value(v) for v in classes]
    if len(set(classes)) != len(classes) or len({type(v) for v in classes}) > 1:
        raise DKGMError("classes must be distinct and all integers or all strings")
    return classes


def per_image(labels, n: int) -> list:
    """``labels`` as a list of ``n`` labels: one label (for all) or one per image."""
    if isinstance(labels, (torch.Tensor, np.ndarray, np.generic)) and np.ndim(labels) == 0:
        return [labels] * n
    if isinstance(labels, (int, str)):
        return [labels] * n
    labels = labels.reshape(-1).tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else list(labels)
    if len(labels) != n:
        raise DKGMError(f"{len(labels)} labels for {n} images")
    return labels


def as_images(images) -> torch.Tensor:
    """The image set as a uint8 tensor ``[N, C, H, W]`` (``[N, H, W]``: one channel)."""
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
