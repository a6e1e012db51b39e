"""The albumentations twin of :class:`dkgm_aug.transforms.DKGMAugment`: numpy HWC in and out.

    import albumentations as A
    from dkgm_aug.albumentations import DKGMAugment
    pipeline = A.Compose([DKGMAugment("fashion-mnist-tiny", p=0.5)], seed=0)
    out = pipeline(image=img)["image"]       # img: HxW or HxWxC, uint8 or float32 in [0, 1]

Seeding follows albumentations: ``A.Compose(..., seed=...)`` or ``t.set_random_seed(seed)``;
the noise seed is drawn from the transform's own ``random_generator`` in ``get_params``, and whether
``p`` fires from its ``py_random``; in a DataLoader worker both are mixed with the worker's seed (as
the torchvision twin does), so that workers and epochs differ while a run stays repeatable under
``torch.manual_seed``.
``A.to_dict``/``A.from_dict`` round-trip a transform built from a checkpoint name or path;
one built from a model object cannot be serialised (``to_dict`` raises).

Albumentations passes no labels to an image transform, so a class-conditional generator is refused
here: use the torchvision ``DKGMAugment`` (``aug(img, label)``) or ``BalancedDKGMDataset``.
"""
import random

import numpy as np
import torch
from albumentations.core.transforms_interface import ImageOnlyTransform

from .augment import filtered_generate
from .dkgm import check_knobs
from .errors import DataError, DKGMError
from .images import numpy_batch, to_unit_hwc
from .label_filter import check_label_filter
from .transforms import _SEED_MAX, GeneratorHandle, check_p


class DKGMAugment(ImageOnlyTransform):
    """Replace the image, with probability ``p``, by a debiased KDE neighbour (see the torchvision twin)."""

    def __init__(self, ckpt, alpha=None, steps=None, convert_channels: bool = False, p: float = 1.0,
                 label_filter=None):
        super().__init__(p=check_p(p))
        self.label_filter = check_label_filter(label_filter)
        self.alpha = None if alpha is None else check_knobs(alpha=alpha)
        self.steps = None if steps is None else check_knobs(steps=steps)
        self.convert_channels = bool(convert_channels)
        self.handle = GeneratorHandle(ckpt)

    def __call__(self, *args, force_apply: bool = False, **data):
        # albumentations calls apply() only when p fires: check the values of every image first
        # (dtype, NaN/inf, range), so that a bad image fails at any p and seed
        for key, value in data.items():
            if key in self._key2func and value is not None:
                for img in (value if isinstance(value, (list, tuple)) else [value]):
                    to_unit_hwc(img)
        model = self.handle.get()
        if getattr(model, "conditional", False) or getattr(model, "per_class", False):
            kind = (f"class-conditional ({model.num_classes} classes)" if getattr(model, "conditional", False)
                    else "a per-class kernel-smoothed score (built with labels)")
            raise DataError(f"this generator is {kind} and the albumentations transform sees no labels: use "
                            "dkgm_aug.DKGMAugment (torchvision), called as aug(img, label), or BalancedDKGMDataset, "
                            "which give the generator each image's class (a kernel-smoothed score built without labels "
                            "draws from the whole set)")
        return super().__call__(*args, force_apply=force_apply, **data)

    def should_apply(self, force_apply: bool = False) -> bool:
        """Whether ``p`` fires, from albumentations' ``py_random``; inside a DataLoader worker mixed with
        the worker's seed, as the noise seed is (every worker holds a copy of the same ``py_random``:
        without it the same draws of every worker, in every epoch, would be augmented)."""
        if self.p <= 0.0 or self.p >= 1.0 or force_apply:
            return super().should_apply(force_apply)
        u = self.py_random.random()
        info = torch.utils.data.get_worker_info()
        if info is not None:
            u = random.Random(f"{u!r} {info.seed}").random()
        return u < self.p

    def get_params(self) -> dict:
        """The noise seed, from albumentations' ``random_generator``; inside a DataLoader worker mixed
        with the worker's seed, which torch draws anew for each worker and each epoch: every worker
        holds a copy of the same generator, so without it all workers, and every epoch, would repeat
        the same noise."""
        seed = int(self.random_generator.integers(0, _SEED_MAX))
        info = torch.utils.data.get_worker_info()
        return {"noise_seed": seed if info is None else (seed * 1_000_003 + info.seed) % _SEED_MAX}

    def apply(self, img: np.ndarray, noise_seed: int = 0, **params) -> np.ndarray:
        x01, restore = numpy_batch(img)
        return restore(filtered_generate(self.handle.get(), x01, [noise_seed], self.alpha, self.steps,
                                         self.convert_channels, label_filter=self.label_filter))

    @property
    def ckpt(self):
        spec = self.handle.spec
        return type(spec).__name__ if isinstance(spec, torch.nn.Module) else str(spec)

    def get_transform_init_args_names(self) -> tuple:
        return ("ckpt", "alpha", "steps", "convert_channels")

    def to_dict_private(self) -> dict:
        if self.label_filter is not None:
            raise DKGMError("a DKGMAugment with a label_filter cannot be serialised (the filter holds a classifier); "
                            "serialise the pipeline without it and add the filter after from_dict")
        if isinstance(self.handle.spec, torch.nn.Module):
            raise DKGMError("a DKGMAugment built from a model object cannot be serialised; build it from a "
                            "checkpoint path or shipped name (save the model with model.save(path))")
        return super().to_dict_private()
