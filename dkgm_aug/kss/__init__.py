"""Kernel-smoothed empirical score: a training-free generator (docs/design.md, section 6).

The model is the training set itself; a neighbour or a new image comes from the reverse SDE
of the set's empirical score, smoothed by a Gaussian kernel so that it does not only copy
training images. The modules read in this order:

* :mod:`~dkgm_aug.kss.score`: the score maths and the reverse SDE (every numerical choice);
* :mod:`~dkgm_aug.kss.model`: :class:`KernelSmoothedScore`, the generator (neighbours, sampling,
  per-class sets, checkpoints);
* :mod:`~dkgm_aug.kss.device_cache`: the set as float chunks on the computing device;
* :mod:`~dkgm_aug.kss.labels`: checks of the image set and its class labels.

:func:`memorisation` and :func:`nearest_neighbour_distances` judge any generator, so they live
in :mod:`dkgm_aug.metrics`; they are also importable from here.

Example::

    ds = dkgm_aug.data.digits("train")
    model = KernelSmoothedScore(ds.images, ds.targets, h=0.5)
    x_new = model.neighbours_from_seeds(x, seeds=[0, 1], labels=[3, 7])   # x in [-1, 1]
    fresh = model.sample(16, labels=3, seeds=range(16))
    model.save("kss-digits.safetensors")                                  # dkgm_aug.load reads it
    memorisation(fresh, ds.images)        # share of samples that copy a training image
"""
from ..metrics import memorisation, nearest_neighbour_distances
from .device_cache import CACHE_ELEMENTS
from .model import MAX_ELEMENTS, KernelSmoothedScore
from .score import empirical_score, smoothed_score, time_grid

__all__ = ["KernelSmoothedScore", "empirical_score", "smoothed_score", "time_grid", "memorisation",
           "nearest_neighbour_distances", "CACHE_ELEMENTS", "MAX_ELEMENTS"]
