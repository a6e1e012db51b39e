"""Image-quality metrics used by the paper and our benchmarks."""
import torch
import torch.nn.functional as F

from .errors import DataError

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
    x = images.float()
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
