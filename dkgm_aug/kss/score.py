"""The kernel-smoothed empirical score and the reverse SDE that samples with it.

Images are flattened to vectors of ``D = C * H * W`` values in ``[-1, 1]``.

Forward process (variance exploding): ``dX = dB``, so ``X_t = X_0 + sqrt(t) * noise``.
Pushed through it, the finite set ``{x_i}`` becomes the Gaussian mixture
``p_t = (1/N) sum_i N(x_i, t I)`` whose score is the *empirical score*::

    s_t(x) = -(x - m_t(x)) / t,   m_t(x) = sum_i w_i(x) x_i,   w = softmax_i(-||x - x_i||^2 / (2 t))

The reverse SDE driven by ``s_t`` can only produce training images (the known
memorisation of the exact empirical score). The *kernel-smoothed* score averages it over
a Gaussian kernel of bandwidth ``h`` in x-space::

    s_t^h(x) = E_xi[ s_t(x + h xi) ] = -(x - E_xi[ m_t(x + h xi) ]) / t,   xi ~ N(0, I)

(the second form uses ``E[xi] = 0``). We estimate the expectation by Monte Carlo with
``n_smooth`` draws of ``xi`` per image and step, averaging only ``m_t`` (the ``h xi``
term has mean 0 and is dropped: same expectation, less variance). ``h = 0`` gives the
exact empirical score. ``h`` is in ``[-1, 1]`` pixel units (per-pixel standard deviation).

Choosing ``h``: what matters is ``h`` against the distance ``d`` between neighbouring
training images, not ``h * sqrt(D)``: near a training image, the kernel moves the nearest
neighbour only along the (nearly orthogonal to ``xi``) directions between images, with
probability about ``Phi(-d / 2h)``. Memorisation fades around ``h ~ d / 4`` and larger ``h``
pulls samples toward blurry local averages (benchmarks/results/kss_memorisation.md:
Fashion-MNIST, ``d ~ 7.8``: 93% copies at ``h = 1``, 46% at 1.5, 12% at 2, blurry at 3+).
The default ``h = 1`` is only a starting point.

The reverse process (the paper fixes none of these choices):

* Reverse SDE of ``dX = dB`` (drift ``f = 0``, diffusion ``g = 1``): in reverse time
  ``tau = T - t`` it is ``dX = g^2 s_t(X) dtau + g dW``, so one Euler-Maruyama step from
  ``t`` down to ``t' < t`` is::

      X_{t'} = X_t + (t - t') * s_t^h(X_t) + sqrt(t - t') * z,   z ~ N(0, I)

  The last step adds no noise.
* Time grid: geometric, ``steps`` steps from the start time down to the end time
  (``t_k = t_start * (t_end / t_start) ** (k / steps)``), so every step shrinks ``t`` by
  the same factor.

The reference set is visited in chunks with a streaming log-sum-exp softmax, so only
``[rows, chunk]`` weights and ``[rows, D]`` running sums exist at once, never ``[rows, N, D]``.
"""
import math

import torch

from .._validate import check_float, check_int
from ..errors import DataError, DKGMError
from ..images import uint8_to_model
from ..kernels import randn
from ..metrics import check_chunk, flat_items


def check_positive(name: str, value, below=None) -> float:
    """``value`` as a float in ``(0, below)``: a time or a noise scale, where 0 would divide by zero."""
    value = check_float(name, value, 0, below)
    if value == 0 or value == below:
        span = f"(0, {below:g})" if below is not None else "> 0"
        raise DKGMError(f"{name} must be a number in {span}, got {value!r}")
    return value


def check_h(h) -> float:
    return check_float("h (smoothing bandwidth)", h, lo=0)


def check_n_smooth(n) -> int:
    return check_int("n_smooth", n, 1, 4096)


def check_steps(steps) -> int:
    return check_int("steps (of the kernel-smoothed score)", steps, 1, 100_000)


def tensor_chunks(ref: torch.Tensor, chunk_size: int):
    """``(ref_chunk [n, D], half squared norms [n])`` for a float reference matrix."""
    for a in range(0, ref.shape[0], chunk_size):
        r = ref[a:a + chunk_size]
        yield r, 0.5 * r.pow(2).sum(1)


def posterior_mean(y: torch.Tensor, chunks, t: float) -> torch.Tensor:
    """``m_t(y) = sum_i softmax_i(-||y - x_i||^2 / 2t) x_i`` for rows ``y [R, D]``, streaming over
    ``chunks`` of the reference set with a running log-sum-exp. ``-||y - x_i||^2 / 2t`` is
    computed as ``(y . x_i - ||x_i||^2 / 2) / t`` (the dropped ``||y||^2`` is constant per row)."""
    run_max = run_sum = acc = None
    for ref, half in chunks:
        logits = (y @ ref.T - half) / t                                  # [R, chunk]
        cmax = logits.amax(1)
        new_max = cmax if run_max is None else torch.maximum(run_max, cmax)
        p = torch.exp(logits - new_max[:, None])
        if run_max is None:
            run_sum, acc = p.sum(1), p @ ref
        else:
            scale = torch.exp(run_max - new_max)
            run_sum = run_sum * scale + p.sum(1)
            acc = acc * scale[:, None] + p @ ref
        run_max = new_max
    if run_max is None:
        raise DataError("the reference set is empty")
    return acc / run_sum[:, None]


def smoothed_mean(x: torch.Tensor, chunks_fn, t: float, h: float, xi) -> torch.Tensor:
    """``mean_s m_t(x + h xi_s)`` with ``xi [B, S, D]`` (or ``m_t(x)`` when ``h == 0``)."""
    if h == 0 or xi is None:
        return posterior_mean(x, chunks_fn(), t)
    b, s, d = xi.shape
    y = (x[:, None, :] + h * xi).reshape(b * s, d)
    return posterior_mean(y, chunks_fn(), t).view(b, s, d).mean(1)


def _flat_pair(x: torch.Tensor, ref: torch.Tensor):
    xf, rf = flat_items(x, "x"), flat_items(ref, "ref").to(x.device)
    rf = rf.to(xf.dtype)
    if xf.shape[1] != rf.shape[1]:
        raise DataError(f"x has {xf.shape[1]} values per item, ref {rf.shape[1]}")
    return xf, rf


def empirical_score(x: torch.Tensor, ref: torch.Tensor, t: float, *, chunk_size: int = 4096) -> torch.Tensor:
    """Exact score ``-(x - m_t(x)) / t`` of the mixture ``(1/N) sum_i N(x_i, t I)``.

    ``x`` is ``[B, ...]``, ``ref`` ``[N, ...]`` with the same number of values per item
    (floats in one space, or uint8 images, read as ``[-1, 1]``). Returns ``x``'s shape."""
    t, chunk_size = check_positive("t", t), check_chunk(chunk_size)
    xf, rf = _flat_pair(x, ref)
    m = posterior_mean(xf, tensor_chunks(rf, chunk_size), t)
    return ((m - xf) / t).view(x.shape)


def smoothed_score(x: torch.Tensor, ref: torch.Tensor, t: float, h: float, *, n_smooth: int = 8,
                   generator=None, xi=None, chunk_size: int = 4096) -> torch.Tensor:
    """Monte Carlo kernel-smoothed score ``-(x - mean_s m_t(x + h xi_s)) / t``, ``xi_s ~ N(0, I)``.

    ``xi`` (``[B, n_smooth, D]``) may be given; else it is drawn from ``generator``.
    ``h = 0`` is the exact :func:`empirical_score`."""
    t, h, chunk_size = check_positive("t", t), check_h(h), check_chunk(chunk_size)
    xf, rf = _flat_pair(x, ref)
    if h > 0 and xi is None:
        xi = randn((xf.shape[0], check_n_smooth(n_smooth), xf.shape[1]), generator, xf.device, xf.dtype)
    if xi is not None and (xi.ndim != 3 or xi.shape[0] != xf.shape[0] or xi.shape[2] != xf.shape[1]):
        raise DKGMError(f"xi must have shape [B, S, D] = [{xf.shape[0]}, S, {xf.shape[1]}], got {tuple(xi.shape)}")
    m = smoothed_mean(xf, lambda: tensor_chunks(rf, chunk_size), t, h, None if h == 0 else xi.to(xf))
    return ((m - xf) / t).view(x.shape)


def time_grid(t_start: float, t_end: float, steps: int) -> list:
    """Geometric grid ``t_start = t_0 > ... > t_steps = t_end``."""
    return [t_start * (t_end / t_start) ** (k / steps) for k in range(steps + 1)]


def reverse_sde(x: torch.Tensor, ts, chunks_fn, h: float, n_smooth: int, draw) -> torch.Tensor:
    """Euler-Maruyama from ``ts[0]`` down to ``ts[-1]`` on rows ``x [B, D]``; ``draw(shape)``
    gives ``[B, *shape]`` noise, drawn in a fixed order: the smoothing draws, then the step's."""
    d = x.shape[1]
    last = len(ts) - 2
    for k in range(len(ts) - 1):
        t, dt = ts[k], ts[k] - ts[k + 1]
        xi = draw((n_smooth, d)) if h > 0 else None
        m = smoothed_mean(x, chunks_fn, t, h, xi)
        x = x + (dt / t) * (m - x)                 # + dt * score
        if k < last:
            x = x + math.sqrt(dt) * draw((d,))
    return x


def noise_drawers(seeds, generator, device, dtype):
    """``for_rows(idx)(shape) -> [len(idx), *shape]`` noise: from one generator per image
    (seeded with ``seeds[i]``, so image ``i``'s draws do not depend on its batch), or, when
    ``seeds`` is None, from the one shared ``generator``."""
    if seeds is not None:
        gens = [torch.Generator().manual_seed(int(s) % 2 ** 64) for s in seeds]

        def for_rows(idx):
            return lambda shape: torch.stack([randn(shape, gens[i], device, dtype) for i in idx])
    else:
        def for_rows(idx):
            return lambda shape: randn((len(idx), *shape), generator, device, dtype)
    return for_rows


def set_radius(images: torch.Tensor, chunk_size: int) -> float:
    """``max_i ||x_i - mean||`` of uint8 images read as ``[-1, 1]``, in float64, in chunks."""
    d = images[0].numel()
    total = torch.zeros(d, dtype=torch.float64)
    for a in range(0, len(images), chunk_size):
        total += uint8_to_model(images[a:a + chunk_size].reshape(-1, d), torch.float64).sum(0)
    mean = total / len(images)
    r = 0.0
    for a in range(0, len(images), chunk_size):
        x = uint8_to_model(images[a:a + chunk_size].reshape(-1, d), torch.float64)
        r = max(r, float((x - mean).pow(2).sum(1).max().sqrt()))
    return r
