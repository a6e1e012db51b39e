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
