"""The per-image seeded noise (``kernels.noise_from_seeds``): Philox4x32-10 in torch integer ops,
checked against Random123's known answers and an independent pure-Python Philox, then for what
the augmentation API relies on (batch independence, determinism, devices) and for its statistics."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from dkgm_aug import DKGMError
from dkgm_aug.kernels import _mulhilo, noise_from_seeds, philox

M32 = 0xFFFFFFFF
KAT = [  # Random123 tests/kat_vectors, "philox4x32 10": counter, key, result
    ((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((M32,) * 4, (M32,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]
KERNELS = ("gaussian", "epanechnikov")
seeds_st = st.lists(st.integers(0, 2 ** 64 - 1), min_size=1, max_size=6)


def py_philox(ctr, key):
    """Philox4x32-10 in Python ints, written from the paper (no shared code with the library)."""
    c, k = list(ctr), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & M32, (k[1] + 0xBB67AE85) & M32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & M32, (p0 >> 32) ^ c[3] ^ k[1], p0 & M32]
    return tuple(c)


def py_gaussian(seed, e):
    """Element ``e`` of the Gaussian draw of ``seed``, as docs/design.md describes the scheme."""
    key = (seed % 2 ** 64 & M32, seed % 2 ** 64 >> 32)
    words = py_philox((e // 4, 0, 0, 0), key)
    u = [((w >> 9) + 0.5) * 2.0 ** -23 for w in words]
    pair = (e % 4) // 2 * 2
    r, theta = math.sqrt(-2 * math.log(u[pair])), 2 * math.pi * u[pair + 1]
    return r * (math.cos(theta) if e % 2 == 0 else math.sin(theta))


@pytest.mark.parametrize("ctr, key, want", KAT)
def test_philox_known_answers(ctr, key, want):
    t = lambda v: tuple(torch.tensor([x]) for x in v)   # noqa: E731
    assert tuple(int(w) for w in philox(t(ctr), t(key))) == want
    assert py_philox(ctr, key) == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, M32), min_size=1, max_size=20), st.sampled_from([0xD2511F53, 0xCD9E8D57, M32, 1]))
def test_mulhilo_is_the_exact_64_bit_product(a, m):
    hi, lo = _mulhilo(torch.tensor(a), m)
    assert [(h << 32) | low for h, low in zip(hi.tolist(), lo.tolist())] == [v * m for v in a]


def test_gaussian_follows_the_documented_scheme():
    seeds = [0, 11, 2 ** 32 + 5, 2 ** 64 - 1, -1]      # -1 is 2**64 - 1 (seeds are taken mod 2**64)
    got = noise_from_seeds(seeds, (7,), dtype=torch.float64)
    want = torch.tensor([[py_gaussian(s, e) for e in range(7)] for s in seeds], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert torch.equal(got[3], got[4])


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=25, deadline=None)
@given(seeds=seeds_st, split=st.integers(0, 6), data=st.data())
def test_an_images_noise_does_not_depend_on_its_batch(kernel, seeds, split, data):
    shape = data.draw(st.sampled_from([(1, 3, 3), (3, 5, 2), (1,)]))
    whole = noise_from_seeds(seeds, shape, kernel)
    parts = torch.cat([noise_from_seeds(seeds[:split], shape, kernel), noise_from_seeds(seeds[split:], shape, kernel)])
    assert torch.equal(whole, parts)
    order = data.draw(st.permutations(range(len(seeds))))
    assert torch.equal(noise_from_seeds([seeds[i] for i in order], shape, kernel), whole[list(order)])


@pytest.mark.parametrize("kernel", KERNELS)
def test_deterministic_under_seed_and_different_across_seeds(kernel):
    a = noise_from_seeds([5, 6, 5], (2, 4, 4), kernel)
    assert torch.equal(a, noise_from_seeds([5, 6, 5], (2, 4, 4), kernel))
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert not torch.equal(noise_from_seeds([5 + 2 ** 32], (2, 4, 4), kernel)[0], a[0])   # the key's high word counts


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_and_shape(kernel, dtype):
    out = noise_from_seeds([1, 2], (3, 5, 7), kernel, dtype=dtype)        # odd element count
    assert out.shape == (2, 3, 5, 7) and out.dtype == dtype and out.device.type == "cpu"
    assert torch.isfinite(out).all()
    ref = noise_from_seeds([1, 2], (3, 5, 7), kernel, dtype=torch.float64)
    tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-5)   # the same numbers, rounded
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol)
    assert noise_from_seeds([], (3, 5), kernel).shape == (0, 3, 5)


def test_unknown_kernel_is_refused():
    with pytest.raises(DKGMError, match="unknown kernel"):
        noise_from_seeds([1], (3,), "laplace")


class DeviceLog(TorchDispatchMode):
    """Records the device of every tensor each torch op makes."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.devices |= {o.device.type for o in (out if isinstance(out, (tuple, list)) else [out])
                         if isinstance(o, torch.Tensor)}
        return out


@pytest.mark.parametrize("kernel", KERNELS)
def test_nothing_is_computed_off_the_target_device(kernel):
    # "meta" stands in for a GPU: a CPU draw copied over (the old scheme) would show up as "cpu"
    with DeviceLog() as log:
        out = noise_from_seeds([3, 4], (1, 6, 6), kernel, device="meta")
    assert out.device.type == "meta" and log.devices == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_matches_cpu(kernel):
    seeds = [0, 1, 2 ** 63 + 7, 123456789]
    cpu = noise_from_seeds(seeds, (3, 32, 32), kernel)
    with DeviceLog() as log:
        gpu = noise_from_seeds(seeds, (3, 32, 32), kernel, device="cuda")
    assert log.devices == {"cuda"}
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


# -- statistics: 4096 seeds x 1024 elements; bounds are about 5 standard errors ----------------------
@pytest.fixture(scope="module")
def draws():
    return {k: noise_from_seeds(range(4096), (1024,), k, dtype=torch.float64) for k in KERNELS}


def ks_distance(x: torch.Tensor, cdf) -> float:
    s = x.flatten().sort().values
    n = len(s)
    f, i = cdf(s), torch.arange(1, n + 1, dtype=s.dtype)
    return torch.maximum(i / n - f, f - (i - 1) / n).max().item()


def epanechnikov_cdf(x):
    k = (x / math.sqrt(5)).clamp(-1, 1)
    return (2 + 3 * k - k ** 3) / 4


@pytest.mark.parametrize("kernel", KERNELS)
def test_moments_and_distribution(draws, kernel):
    z = draws[kernel]
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(n)       # sd of the sample sd < 1/sqrt(n) for both
    assert abs(z.pow(3).mean().item()) < 5 * math.sqrt(15 / n)
    cdf = (lambda s: 0.5 * (1 + torch.erf(s / math.sqrt(2)))) if kernel == "gaussian" else epanechnikov_cdf
    assert ks_distance(z, cdf) < 1.95 / math.sqrt(n)       # the KS test's 0.001 level
    if kernel == "gaussian":
        assert abs(z.pow(4).mean().item() - 3) < 5 * math.sqrt(96 / n)
        assert 4.5 < z.abs().max().item() < 5.8            # tails reach out; 23-bit uniforms stop at 5.77
    else:
        assert z.abs().max().item() <= math.sqrt(5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("lag", ["seed+1", "seed+2**32", "pixel+1", "pixel+2", "pixel+4"])
def test_no_correlation_between_neighbours(draws, kernel, lag):
    z = draws[kernel]
    if lag == "seed+1":
        a, b = z[:-1], z[1:]
    elif lag == "seed+2**32":
        a, b = z, noise_from_seeds(range(2 ** 32, 2 ** 32 + 4096), (1024,), kernel, dtype=torch.float64)
    else:
        k = int(lag[-1])
        a, b = z[:, :-k], z[:, k:]
    r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
    assert abs(r) < 5 / math.sqrt(a.numel())
    if lag == "pixel+1" and kernel == "gaussian":
        # Box-Muller pairs are independent, not just uncorrelated: their squares are uncorrelated too
        r2 = torch.corrcoef(torch.stack([a[:, 0::2].flatten() ** 2, b[:, 0::2].flatten() ** 2]))[0, 1].item()
        assert abs(r2) < 5 / math.sqrt(a[:, 0::2].numel())
