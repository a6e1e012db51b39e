"""The albumentations twin of :class:`dkgm_aug.transforms.DKGMAugment`: numpy HWC in and out.

    import albumentations as A
    from dkgm_aug.albumentations import DKGMAugment
    pipeline = A.Compose([DKGMAugment("fashion-mnist-tiny", p=0.5)], seed=0)
    out = pipeline(image=img)["image"]       # img: HxW or HxWxC, uint8 or float32 in [0, 1]

Seeding follows albumentations: ``A.Compose(..., seed=...)`` or ``t.set_random_seed(seed)``;
the noise seed is drawn from the transform's own ``random_generator`` in ``get_params``.
"""
import numpy as np
import torch
from albumentations.core.transforms_interface import ImageOnlyTransform

from .augment import generate
from .dkgm import check_knobs
from .errors import DataError
from .transforms import GeneratorHandle, check_p


class DKGMAugment(ImageOnlyTransform):
    """Replace the image, with probability ``p``, by a debiased KDE neighbour (see the torchvision twin)."""

    def __init__(self, ckpt, alpha=None, steps=None, convert_channels: bool = False, p: float = 1.0):
        super().__init__(p=check_p(p))
        self.alpha = None if alpha is None else check_knobs(alpha=alpha)
        self.steps = None if steps is None else check_knobs(steps=steps)
        self.convert_channels = bool(convert_channels)
        self.handle = GeneratorHandle(ckpt)

    def get_params(self) -> dict:
        return {"noise_seed": int(self.random_generator.integers(0, 2 ** 62))}

    def apply(self, img: np.ndarray, noise_seed: int = 0, **params) -> np.ndarray:
        if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.size == 0:
            raise DataError(f"expected a non-empty numpy HxW or HxWxC image, got "
                            f"{getattr(img, 'shape', type(img).__name__)}")
        if img.dtype == np.uint8:
            x01 = torch.from_numpy(img.astype(np.float32) / 255.0)
        elif img.dtype == np.float32:
            x01 = torch.from_numpy(img.copy())
        else:
            raise DataError(f"images must be uint8 or float32 in [0, 1], got {img.dtype}")
        x01 = (x01[..., None] if img.ndim == 2 else x01).permute(2, 0, 1)[None]
        out = generate(self.handle.get(), x01, [noise_seed], self.alpha, self.steps, self.convert_channels)
        out = out[0].permute(1, 2, 0).numpy()
        out = out[..., 0] if img.ndim == 2 else out
        return (out * 255).round().astype(np.uint8) if img.dtype == np.uint8 else out.astype(np.float32)

    def get_transform_init_args_names(self) -> tuple:
        return ("alpha", "steps", "convert_channels")
