"""Depthwise Gaussian blur with a per-image bandwidth: stage 2's training input.

docs/design.md, section 1: standard deviation ``b`` pixels, kernel radius ``ceil(3b)``,
reflect padding. An image smaller than its own radius falls back to replicate padding (reflect
needs the pad to be smaller than the image); the choice is per image, never the batch's.
"""
import math

import torch
import torch.nn.functional as F

from .kernels import rand


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Blur each image of ``x`` (``[B, C, H, W]``) with its own ``sigma`` (``[B]`` or scalar). Each
    image's result depends on its own ``sigma`` only: its padding is reflect when its own radius fits
    the image, replicate otherwise, whatever the other images of the batch."""
    b, c, h, w = x.shape
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).flatten().expand(b)
    if bool((sigma <= 0).all()):
        return x.clone()
    fits = torch.ceil(3 * sigma) < min(h, w)
    if bool(fits.all()) or not bool(fits.any()):
        return _blur(x, sigma, "reflect" if bool(fits[0]) else "replicate")
    out = torch.empty_like(x)
    out[fits] = _blur(x[fits], sigma[fits], "reflect")
    out[~fits] = _blur(x[~fits], sigma[~fits], "replicate")
    return out


def _blur(x: torch.Tensor, sigma: torch.Tensor, mode: str) -> torch.Tensor:
    """The separable blur of a batch whose images all pad with ``mode``; one kernel length, the
    largest radius, each image's taps beyond its own radius ``ceil(3b)`` zero."""
    b, c, h, w = x.shape
    radius = max(0, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    s = sigma.clamp_min(1e-6)[:, None]
    weights = torch.exp(-offsets[None] ** 2 / (2 * s ** 2))
    weights = weights * (offsets[None].abs() <= torch.ceil(3 * s))   # each image keeps radius ceil(3b)
    weights = weights / weights.sum(dim=1, keepdim=True)
    weights = weights.to(x.dtype).repeat_interleave(c, dim=0)        # [B*C, K]
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode=mode), weights[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode=mode), weights[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def random_blur(x: torch.Tensor, b_range=(0.5, 1.0), generator=None) -> torch.Tensor:
    """Blur each image with ``b ~ Uniform[b_range]`` drawn per image."""
    lo, hi = b_range
    sigma = lo + (hi - lo) * rand((x.shape[0],), generator, x.device)
    return gaussian_blur(x, sigma)
