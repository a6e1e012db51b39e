"""Noise kernels: the one place where dkgm_aug draws random numbers for its models.

Two sources. :func:`noise` and friends take an optional ``torch.Generator`` (training, and
``DKGM.sample``), so that a caller can seed them. :func:`noise_from_seeds` gives one draw per
seed from a counter-based generator (Philox4x32-10, written in torch integer ops): a pure
function of ``(seed, element index)``, computed on the target device, so per-image seeded
noise needs no CPU work and no copy, does not depend on the batch, and agrees across devices.
"""
import math

import torch

from .errors import DKGMError

KERNELS = ("gaussian", "epanechnikov")

# The version of noise_from_seeds' numbers. What stores images made from seeded noise (the
# BalancedDKGMDataset cache, the neighbour bank) records it in its fingerprint, so that images
# made under another scheme are refused, not mixed with new ones. Before it, the seeded noise
# was torch's CPU generator re-seeded per image, and fingerprints had no such key
# (docs/design.md, section 7).
NOISE_SCHEME = "philox4x32-10/v1"

_M32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)     # Random123's multipliers and Weyl key increments
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


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


def _mulhilo(a: torch.Tensor, m: int):
    """High and low 32 bits of ``a * m`` (``a`` holds 32-bit values in int64, ``m`` is a 32-bit
    constant). The product is split at bit 16 so that no int64 result exceeds 2**49: signed
    overflow would be undefined, and CPU and CUDA must agree bit for bit."""
    p1, p0 = a * (m >> 16), a * (m & 0xFFFF)
    t = ((p1 & 0xFFFF) << 16) + p0
    return (p1 >> 16) + (t >> 32), t & _M32


def philox(counter, key, rounds: int = 10) -> tuple:
    """Philox4x32 (Salmon et al., SC'11; Random123's test vectors hold): ``counter`` is four and
    ``key`` two broadcastable int64 tensors of 32-bit values; returns four such tensors."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _M32, (k1 + _PHILOX_W[1]) & _M32
        hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _uniforms(keys: torch.Tensor, n: int, stream: int, dtype) -> torch.Tensor:
    """``[len(keys), n]`` uniforms in (0, 1), 23 random bits each, at bin midpoints (exact in float32,
    symmetric about 1/2; the Gaussian's tails stop at 5.8 sigma). Element
    ``e`` of row ``i`` is word ``e % 4`` of Philox at counter ``(e // 4, stream)``, key ``keys[i]``."""
    blocks = torch.arange((n + 3) // 4, device=keys.device)[None]
    counter = (blocks & _M32, blocks >> 32, torch.full_like(blocks, stream), torch.zeros_like(blocks))
    words = torch.stack(philox(counter, (keys[:, :1], keys[:, 1:])), -1).flatten(1)[:, :n]
    return ((words >> 9).to(dtype) + 0.5) * 2.0 ** -23


def noise_from_seeds(seeds, shape, kernel: str = "gaussian", device=None, dtype=torch.float32) -> torch.Tensor:
    """One unit-variance draw of ``shape`` per seed, stacked into ``[len(seeds), *shape]``, made on
    ``device``. Draw ``i`` is a function of ``seeds[i]`` (taken modulo 2**64) and the element
    index only, so an image's noise does not depend on its batch, and CPU and CUDA agree to float
    rounding (the integer part is exact). Gaussian: Box-Muller on pairs of uniforms; Epanechnikov:
    the median of three uniform streams, as :func:`noise`. Computed in float64 when ``dtype`` is,
    else in float32 and then cast."""
    if kernel not in KERNELS:
        raise DKGMError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    target = torch.device(device or "cpu")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    s = [int(v) % 2 ** 64 for v in seeds]
    keys = torch.tensor([[v & _M32, v >> 32] for v in s], dtype=torch.int64, device=target).view(-1, 2)
    n = math.prod(shape)
    if kernel == "gaussian":
        u = _uniforms(keys, n + n % 2, 0, work)
        r, theta = (-2 * u[:, 0::2].log()).sqrt(), (2 * math.pi) * u[:, 1::2]
        out = torch.stack([r * theta.cos(), r * theta.sin()], -1).flatten(1)[:, :n]
    else:
        a, b, c = (_uniforms(keys, n, stream, work) * 2 - 1 for stream in (1, 2, 3))
        out = torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c)) * math.sqrt(5.0)   # median
    return out.reshape(len(s), *shape).to(dtype)


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
