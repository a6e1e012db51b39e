"""Image-quality metrics used by the paper and our benchmarks, and the memorisation
metric that judges every generator against its training set."""
import warnings

import torch
import torch.nn.functional as F

from ._validate import check_float, check_int
from .errors import DataError, DKGMError
from .images import tensor_unit, uint8_to_model

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_LUMA = (0.299, 0.587, 0.114)


def sharpness(images: torch.Tensor) -> float:
    """The paper's sharpness (appendix "Calculation of Sharpness"): convert to grayscale,
    convolve with the Laplacian ``[[0,1,0],[1,-4,1],[0,1,0]]`` (no padding), take the
    variance per image and average over images. ``images``: ``[B, C, H, W]`` in ``[0, 1]``.

    >>> sharpness(torch.rand(4, 1, 28, 28)) > sharpness(torch.full((4, 1, 28, 28), 0.5))
    True
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3) or min(images.shape[-2:]) < 3:
        raise DataError(f"sharpness takes [B, 1 or 3, H>=3, W>=3] images in [0, 1], got {tuple(images.shape)}")
    x = tensor_unit(images, "sharpness's images")   # uint8 / 255 (it was read as 0 .. 255: 65,025x); [-1, 1] refused
    if x.shape[1] == 3:
        x = sum(w * x[:, i:i + 1] for i, w in enumerate(_LUMA))
    lap = F.conv2d(x, _LAPLACIAN.to(x.device)[None, None])
    return float(lap.flatten(1).var(dim=1, correction=0).mean())


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]`` (tensors or
    arrays; at least 2 rows each, same ``D``)::

        ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))

    with unbiased covariances. The trace of the matrix square root is computed as
    ``sum_i sqrt(lambda_i)`` over the eigenvalues of the symmetric PSD matrix
    ``S_a^(1/2) S_b S_a^(1/2)`` (which has the eigenvalues of ``S_a S_b``), in float64, with
    round-off negatives clipped to 0: no complex square root arises, so there are no tiny
    imaginary parts to drop. With a feature extractor trained by us this is a "Frechet
    distance in our classifier's feature space", not FID (which means Inception-v3 features).

    >>> import numpy as np; a = np.random.default_rng(0).normal(size=(500, 3))
    >>> round(frechet_distance(a, a), 6), round(frechet_distance(a, a + [1.0, 2.0, 0.0]), 6)
    (0.0, 5.0)
    """
    import numpy as np
    a, b = (np.asarray(f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f, dtype=np.float64)
            for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise DataError(f"frechet_distance takes two [N, D] feature sets with the same D and N >= 2, "
                        f"got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("features contain NaN or inf values")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root_a @ cov_b @ root_a
    lam = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_root = float(np.sqrt(np.clip(lam, 0, None)).sum())
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_root)
    return max(fd, 0.0)


def flat_items(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x [N, ...]`` as ``[N, D]`` floats; uint8 images are read as ``[-1, 1]``."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataError(f"{name} is empty: shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1)
    if x.dtype == torch.uint8:
        return uint8_to_model(x)
    if not x.is_floating_point():
        raise DataError(f"{name} must be a float tensor (or uint8 images), got {x.dtype}")
    return x


def check_same_scale(samples, train) -> None:
    """Warn on uint8 images on one side and floats in [0, 1] on the other: uint8 is read as [-1, 1]
    (the generators' scale), so [0, 1] floats against it (DKGMAugment's output, a dataset's items)
    were compared across scales and every distance was wrong."""
    kinds = []
    for x in (samples, train):
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return
        kinds.append("uint8" if x.dtype == torch.uint8 else
                     "[0, 1]" if x.is_floating_point() and float(x.min()) >= 0 else "other")
    if set(kinds) == {"uint8", "[0, 1]"}:    # a warning: a [-1, 1] set may have no negative value (mid-gray)
        warnings.warn(f"samples are {kinds[0]} and train {kinds[1]} images: uint8 is read as [-1, 1], so if the "
                      "floats are [0, 1] images the two are compared on different scales; pass both as uint8, or "
                      "both as floats on one scale (x01 * 2 - 1 for [-1, 1])", stacklevel=3)


def check_chunk(chunk_size) -> int:
    return check_int("chunk_size", chunk_size, 1, 2 ** 24)


def nearest_neighbour_distances(samples: torch.Tensor, train: torch.Tensor, k: int = 2, *,
                                chunk_size: int = 4096):
    """Euclidean distances ``[B, k]`` (ascending) and indices ``[B, k]`` of each sample's ``k``
    nearest training items, in float64, streaming over ``train`` in chunks. Both are
    ``[N, ...]`` with the same values per item; uint8 images are read as ``[-1, 1]``."""
    chunk_size = check_chunk(chunk_size)
    check_same_scale(samples, train)
    s = flat_items(samples, "samples").double()
    # train stays in its own dtype (uint8 for an image set): each chunk becomes float64 in turn
    tr = train.reshape(train.shape[0], -1) if isinstance(train, torch.Tensor) and train.ndim >= 1 else train
    if not isinstance(tr, torch.Tensor) or tr.shape[0] == 0:
        raise DataError("train is empty")
    k = check_int("k (at most the training set size)", k, 1, tr.shape[0])
    if tr.shape[1] != s.shape[1]:
        raise DataError(f"samples have {s.shape[1]} values per item, train {tr.shape[1]}")
    s = s.to(tr.device)
    s_sq = s.pow(2).sum(1, keepdim=True)
    best_d = best_i = None
    for a in range(0, tr.shape[0], chunk_size):
        r = flat_items(tr[a:a + chunk_size], "train").double()
        d2 = (s_sq - 2 * s @ r.T + r.pow(2).sum(1)[None]).clamp_min(0)
        idx = torch.arange(a, a + r.shape[0], device=s.device).expand_as(d2)
        if best_d is not None:
            d2, idx = torch.cat([best_d, d2], 1), torch.cat([best_i, idx], 1)
        best_d, pos = d2.topk(min(k, d2.shape[1]), dim=1, largest=False)
        best_i = idx.gather(1, pos)
    return best_d.sqrt(), best_i


def memorisation(samples: torch.Tensor, train: torch.Tensor, ratio: float = 1 / 3, *,
                 chunk_size: int = 4096) -> float:
    """Share of samples whose nearest training item is closer than ``ratio`` times the
    distance to the second nearest (the kernel-smoothed score paper's memorisation criterion). The mean
    nearest-neighbour distance (novelty) is ``nearest_neighbour_distances(...)[0][:, 0].mean()``."""
    if check_float("ratio", ratio, 0, 1) == 0:
        raise DKGMError(f"ratio must be in (0, 1], got {ratio!r}")
    if isinstance(train, torch.Tensor) and train.ndim >= 1 and train.shape[0] < 2:
        raise DataError("memorisation needs at least 2 training items (nearest and second nearest)")
    d, _ = nearest_neighbour_distances(samples, train, 2, chunk_size=chunk_size)
    return float((d[:, 0] < ratio * d[:, 1]).double().mean())
