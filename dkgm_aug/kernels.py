"""Noise kernels: the one place where dkgm_aug draws random numbers for its models.

Every function takes an optional ``torch.Generator`` so that a caller can seed it.
"""
import math

import torch

from .errors import DKGMError

KERNELS = ("gaussian", "epanechnikov")


def _draw(fn, shape, generator, device, dtype):
    # A generator lives on one device; draw there and move, so a CPU generator
    # can seed work that runs on a GPU.
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")
    out = fn(*shape, generator=generator, device=gen_device, dtype=dtype)
    return out.to(device) if device is not None else out


def randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    return _draw(torch.randn, tuple(shape), generator, device, dtype)


def rand(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    return _draw(torch.rand, tuple(shape), generator, device, dtype)


def noise_from_seeds(seeds, shape, kernel: str = "gaussian", device=None, dtype=torch.float32) -> torch.Tensor:
    """One unit-variance draw of ``shape`` per seed, stacked into ``[len(seeds), *shape]``.

    Draw ``i`` equals ``noise(shape, kernel, torch.Generator().manual_seed(seeds[i]))``, so an
    image's noise does not depend on the batch it is in. All draws come from one CPU generator,
    re-seeded per image, into one buffer (pinned when bound for a GPU) that is copied to
    ``device`` in one go."""
    target = torch.device(device or "cpu")
    pin = target.type == "cuda" and torch.cuda.is_available()
    out = torch.empty((len(seeds), *shape), pin_memory=pin)
    g = torch.Generator()
    for i, s in enumerate(seeds):
        g.manual_seed(int(s))
        out[i] = noise(shape, kernel, g)
    return out.to(target, dtype, non_blocking=pin)


def standard_epanechnikov(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard Epanechnikov on ``[-1, 1]`` (density ``3/4 (1 - k^2)``): the median of
    three ``U[-1, 1]`` draws (EVAE, section 3). Mean 0, variance 1/5."""
    u = rand((3, *shape), generator, device, dtype) * 2 - 1
    return u.median(dim=0).values


def noise(shape, kernel: str = "gaussian", generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Unit-variance noise from ``kernel``: Gaussian, or Epanechnikov scaled by sqrt(5)
    so that both kernels have the same standard deviation (docs/design.md, section 1)."""
    if kernel == "gaussian":
        return randn(shape, generator, device, dtype)
    if kernel == "epanechnikov":
        return standard_epanechnikov(shape, generator, device, dtype) * math.sqrt(5.0)
    raise DKGMError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
