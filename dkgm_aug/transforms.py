"""``DKGMAugment``: a torchvision v2 transform that replaces images by DKGM KDE neighbours.

Random parameters are drawn in :meth:`DKGMAugment.make_params` (which images of a
batch to change, and one noise seed per image) and applied deterministically in
:meth:`DKGMAugment.transform`, so ``t.transform(x, params)`` replays a call.

Two ways to use it:

* per image, in a Dataset's transform (CPU DataLoader workers)::

      from torchvision import transforms
      tf = transforms.Compose([DKGMAugment("fashion-mnist-tiny", alpha=0.5, p=0.5), transforms.ToTensor()])

* batched, on a collated batch on the GPU (like kornia): much faster, one U-Net call
  per batch instead of per image::

      aug = DKGMAugment("fashion-mnist-tiny", p=0.5, device="cuda")
      for x, y in loader:                       # x: [B, C, H, W] uint8 or float in [0, 1]
          x = aug(x.cuda(non_blocking=True))

Inputs: PIL images (mode L or RGB), ``tv_tensors.Image``, plain CHW or BCHW tensors
(uint8, or float in [0, 1]). The output has the input's type, dtype, shape, device
and value range; the input is never modified. Which inputs of a sample are images follows
torchvision v2: PIL images and ``tv_tensors.Image``, and a plain tensor only when the sample
has neither (the first one found). Masks, bounding boxes, keypoints, labels and other values
pass through untouched; a ``tv_tensors.Video`` is refused (pass its frames as an Image).
The whole input is checked before ``p`` is drawn: NaN/inf, floats outside [0, 1] (as after
``Normalize`` or in [0, 255]; within 1e-3 of it is rounding and clamped), channels-last
tensors and images over 64x the generator's training pixels raise a ``DataError``.

Seeding: ``seed=None`` draws from torch's global RNG (DataLoader workers are seeded
differently, so workers differ). With ``seed=int`` the transform owns a generator;
inside a DataLoader worker it is re-seeded once from ``(seed, worker seed)`` so that
workers never repeat each other's noise, and a seeded DataLoader stays reproducible.
The generator checkpoint loads lazily, so the transform pickles small for workers.

Class-conditional generators (``DKGM.from_preset(..., num_classes=...)``) take each image's class
from the sample: ``aug(img, label)`` (an int or a 0-d integer tensor) or ``aug(x, y)`` (``x``
``[B, C, H, W]``, ``y`` a 1-D integer tensor of length B) returns ``(new images, labels unchanged)``.
The label is the value under a ``label`` (or ``target``, ``y``...) key of a dict sample (a dict
without exactly one such key is refused), else the sample's one non-image input that is a number
or a plain tensor of at most one dimension (a tuple with several, ``(img, index, label)``, is
refused). Unconditional generators never see the labels.
"""
import contextvars
import copy
import numbers
import threading
from collections.abc import Mapping

import numpy as np
import PIL.Image
import torch
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import is_pure_tensor

from ._validate import check_device, check_seed
from .augment import accelerate, check_acceleration, check_image_size, filtered_generate, load_generator, model_device
from .dkgm import check_knobs, class_indices
from .errors import DataError, DKGMError
from .images import to_batch
from .label_filter import check_label_filter
from .sampling import check_class_names, plain_label

_SEED_MAX = 2 ** 62
# the whole sample of the call in progress (this thread's): make_params sees only its images
_SAMPLE = contextvars.ContextVar("dkgm_aug_sample", default=())


class SeedSource:
    """Where the torchvision transform's random numbers come from: torch's global RNG, or an
    owned, worker-aware ``torch.Generator`` (the albumentations twin draws from albumentations'
    own ``random_generator`` instead)."""

    def __init__(self, seed=None):
        if seed is not None and not isinstance(seed, torch.Generator):
            seed = check_seed(seed)
        self.seed = seed
        self.generator = seed if isinstance(seed, torch.Generator) else (
            torch.Generator().manual_seed(int(seed)) if seed is not None else None)
        self._worker = None

    def __getstate__(self):
        # torch pickles a Generator's state as a shared-memory tensor, which fails where
        # /dev/shm is small; plain bytes travel to spawned workers everywhere.
        state = dict(self.__dict__)
        if self.generator is not None:
            state["generator"] = bytes(self.generator.get_state().numpy())
        if isinstance(self.seed, torch.Generator):
            state["seed"] = self.seed.initial_seed()
        return state

    def __setstate__(self, state):
        if state["generator"] is not None:
            gen = torch.Generator()
            gen.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
            state["generator"] = gen
        self.__dict__.update(state)

    def _in_worker(self):
        info = torch.utils.data.get_worker_info()
        if info is not None and self.generator is not None and self._worker != info.id:
            self._worker = info.id
            base = int(self.seed) if isinstance(self.seed, numbers.Integral) else self.generator.initial_seed()
            self.generator = torch.Generator().manual_seed((base * 1_000_003 + info.seed) % _SEED_MAX)

    def rand(self, n: int) -> torch.Tensor:
        self._in_worker()
        return torch.rand(n, generator=self.generator)

    def seeds(self, n: int) -> list:
        self._in_worker()
        return torch.randint(0, _SEED_MAX, (n,), generator=self.generator).tolist()


def check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 <= p <= 1.0):
        raise DKGMError(f"p (probability of augmenting an image) must be in [0, 1], got {p!r}")
    return float(p)


class GeneratorHandle:
    """A generator spec that loads once per process, also when threads share it (cast to ``dtype``
    and compiled when asked: :func:`dkgm_aug.augment.accelerate`); pickles as the spec alone
    unless the spec is the model in use."""

    def __init__(self, spec, device=None, dtype=None, compile: bool = False):
        if not isinstance(spec, torch.nn.Module):
            from .checkpoint import resolve
            resolve(spec)                       # fail now, not in a worker, if the file is missing
        self.spec, self.device, self.dtype, self.compile, self._model = spec, device, dtype, compile, None
        self._lock = threading.Lock()

    def get(self, like: torch.Tensor | None = None):
        with self._lock:
            if self._model is None:
                self._model = accelerate(load_generator(self.spec, self.device), self.dtype, self.compile)
            if self.device is None and like is not None and model_device(self._model) != like.device:
                # follow the input's device (a copy of a user's model object: it is not moved)
                self._model = (copy.deepcopy(self._model) if self._model is self.spec else self._model).to(like.device)
            return self._model

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]                      # locks do not pickle; each process makes its own
        if state["_model"] is not self.spec:   # a loaded file, or a cast/compiled copy: rebuilt where unpickled
            state["_model"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class KeepsSample:
    """A mixin for a v2 transform whose ``make_params`` reads the sample's label: torchvision hands
    it only the images, so ``forward`` keeps the whole sample at hand (``_SAMPLE``, unflattened)
    meanwhile."""

    def forward(self, *inputs):
        sample = inputs if len(inputs) > 1 else inputs[0]
        token = _SAMPLE.set(sample)
        try:
            return super().forward(*inputs)
        finally:
            _SAMPLE.reset(token)


class DKGMAugment(KeepsSample, v2.Transform):
    """Replace each image, with probability ``p``, by a debiased KDE neighbour from a DKGM generator.

    ``ckpt``: a shipped name (``dkgm_aug.list_pretrained()``), a checkpoint path, or a model.
    ``alpha``/``steps``: the generator's defaults when ``None``. ``device``: where the
    generator runs (``None``: the input's device; a CUDA/MPS device this machine lacks is
    refused here). ``seed``: an int in [0, 2**63) or a ``torch.Generator``.
    ``label_filter``: a :class:`dkgm_aug.LabelFilter`; a neighbour its classifier puts in another
    class than the classifier's prediction on the source is redrawn with the next seed.
    ``convert_channels``: allow gray <-> RGB conversion when the image and the generator
    differ. It does not keep colour: an RGB image through a gray generator goes in as its
    luminance, and its neighbour comes back gray, replicated on the 3 channels (a gray image
    through an RGB generator goes in replicated and comes back as the luminance of the result).
    A class-conditional generator takes each image's class from the sample: ``aug(img, label)``,
    ``aug(x, y)`` (module docstring); the labels come back unchanged. ``classes``: your data's class
    names in label order (e.g. ``dataset.classes``); with a conditional generator that recorded its
    own, a class at another index (an image folder sorts its folders by name) is refused at the
    first call instead of conditioning every image of it on another class.

    Speed, opt-in (benchmarks/RESULTS.md, section 3): ``dtype=torch.float16`` generates in fp16
    (CUDA only, so it needs ``device="cuda"``; pixels within one uint8 step of fp32).
    ``compile=True`` compiles the generator's networks with ``torch.compile``. The first call
    pays the compilation, and the first call with a new batch size pays it once more (then the
    batch size is symbolic), in every process, so in every DataLoader worker. Measured once with
    ``fashion-mnist-tiny`` and an empty inductor cache: on a CPU (a busy shared 2-core machine,
    one thread, batches of 64 28x28 images) the first call took 101 s (eager: 1.6 s), the first
    at a new batch size 56 s, then 0.76 s a call against 0.90 s eager; on an H200 (batches of
    1024) 32 s and 19 s, then 41.7 ms a call against 54.4 ms eager (fp16: 42.2 ms). Both act on a
    copy of a model object; the images differ from the default ones by float rounding only.

    >>> aug = DKGMAugment("fashion-mnist-tiny", p=1.0, seed=0)       # doctest: +SKIP
    >>> aug(pil_image)                                              # doctest: +SKIP
    """

    # torchvision v2 decides which inputs of a sample are images from these (with its rule that a
    # plain tensor is an image only when the sample has no Image, Video or PIL image); masks,
    # boxes, keypoints and other values pass through. Videos are taken only to be refused.
    _transformed_types = (tv_tensors.Image, tv_tensors.Video, PIL.Image.Image, is_pure_tensor)

    def __init__(self, ckpt, alpha=None, steps=None, p: float = 1.0, device=None, seed=None,
                 convert_channels: bool = False, label_filter=None, dtype=None, compile: bool = False,
                 classes=None):
        super().__init__()
        if classes is not None and (isinstance(classes, (str, bytes)) or not hasattr(classes, "__len__")):
            raise DKGMError(f"classes must be a list of class names in label order (e.g. dataset.classes), "
                            f"got {classes!r}")
        self.classes = None if classes is None else list(classes)
        self._classes_checked = None     # id() of the model the class order was checked against
        self.label_filter = check_label_filter(label_filter)
        self.alpha = None if alpha is None else check_knobs(alpha=alpha)
        self.steps = None if steps is None else check_knobs(steps=steps)
        self.p = check_p(p)
        self.device = check_device(device)
        self.convert_channels = bool(convert_channels)
        self.dtype, self.compile = check_acceleration(dtype, compile, self.device)
        self.handle = GeneratorHandle(ckpt, self.device, self.dtype, self.compile)
        self.rng = SeedSource(seed)

    def make_params(self, flat_inputs) -> dict:
        n, sample = batch_size(flat_inputs[0]) if flat_inputs else 1, _SAMPLE.get()
        return dict(apply=self.rng.rand(n) < self.p, seeds=self.rng.seeds(n),
                    labels=sample_label(sample, tree_flatten(sample)[0], flat_inputs))

    def transform(self, inpt, params: dict):
        # the whole input is checked before p is looked at, so a bad image fails at any p and seed
        x01, restore = to_batch(inpt)
        model = self.handle.get(like=x01 if self.device is None else None)
        check_image_size(model, *x01.shape[-2:])
        if self.classes is not None and self._classes_checked != id(model):   # once per loaded model
            check_class_names(model, self.classes)
            self._classes_checked = id(model)
        labels = model_labels(model, params.get("labels"), len(x01))
        apply = params["apply"]
        if not bool(apply.any()):
            return inpt
        if len(apply) != len(x01):
            raise DKGMError(f"params were drawn for {len(apply)} images, the input has {len(x01)}")
        idx = torch.nonzero(apply).flatten()
        out = x01.clone()
        out[idx] = filtered_generate(model, x01[idx], [params["seeds"][i] for i in idx.tolist()], self.alpha,
                                     self.steps, self.convert_channels, label_filter=self.label_filter,
                                     labels=None if labels is None else [labels[i] for i in idx.tolist()])
        return restore(out, idx)

    def extra_repr(self) -> str:
        spec = self.handle.spec if not isinstance(self.handle.spec, torch.nn.Module) else type(self.handle.spec).__name__
        return (f"ckpt={spec!r}, alpha={self.alpha}, steps={self.steps}, p={self.p}, device={self.device}, "
                f"dtype={self.dtype}, compile={self.compile}")


def batch_size(inpt) -> int:
    return inpt.shape[0] if isinstance(inpt, torch.Tensor) and inpt.ndim == 4 else 1


LABEL_KEYS = ("label", "labels", "target", "targets", "class", "y")


class AmbiguousLabel(str):
    """Why a sample's class is unknown (numbers in a dict, none or several under a label key; in a
    tuple, more than one beside the image): the error a generator that uses labels raises."""


def _is_label(v) -> bool:
    """A class label: a number, a string (a per-class model's class value), or a plain tensor or
    numpy array of at most one dimension."""
    return (isinstance(v, (numbers.Number, np.generic, str)) or (is_pure_tensor(v) and v.ndim <= 1)
            or (type(v) is np.ndarray and v.ndim <= 1))


def sample_label(sample, flat_sample, images):
    """The label(s) of a sample. In a dict (the sample, or a dict inside a tuple sample) the value
    under a key of ``LABEL_KEYS``; else the one input, other than ``images``, that is a number or
    a plain tensor of at most one dimension (``(img, label)``; a string only when no number is there:
    a path beside the label is not the class); ``None`` when there is none. A dict sample with numbers
    but not exactly one under a label key, or a tuple with several numbers beside the image, gives an
    :class:`AmbiguousLabel`, which a generator that uses labels refuses (an index or id field must not
    become the class)."""
    dicts = [sample] if isinstance(sample, Mapping) else [d for d in sample if isinstance(d, Mapping)] \
        if isinstance(sample, (tuple, list)) else []
    named = [d[k] for d in dicts for k in LABEL_KEYS if k in d and _is_label(d[k])]
    if len(named) == 1:
        return named[0]
    taken = {id(i) for i in images}
    found = [v for v in flat_sample if id(v) not in taken and _is_label(v)]
    numeric = [v for v in found if not isinstance(v, str)]     # a file path beside the label is not a class
    if found and (named or isinstance(sample, Mapping)):
        return AmbiguousLabel(f"the sample is a dict holding {len(found)} number(s), but not one under exactly one "
                              f"of the keys {list(LABEL_KEYS)}, so its class is unknown: put the class under the key "
                              "'label' (or pass (img, label))")
    if len(numeric) > 1:
        return AmbiguousLabel(f"the sample holds more than one number beside its image ({len(numeric)}), so its "
                              "class is unknown (an index or a weight must not become the class): pass (img, label), "
                              "or a dict with the class under the key 'label' (a batch's labels: one 1-D integer "
                              "tensor)")
    return (numeric or found or [None])[0]


def model_labels(model, label, n: int) -> list | None:
    """The class indices (ints) a class-conditional ``model`` takes for ``n`` images from a sample's
    ``label``, checked; a per-class kernel-smoothed score's class label values (checked by the model;
    ``None`` without a label: the whole set); ``None`` for an unconditional model, which never sees labels."""
    uses_labels = getattr(model, "per_class", False) or getattr(model, "conditional", False)
    if isinstance(label, AmbiguousLabel):
        if not uses_labels:
            return None
        raise DataError(str(label))
    if getattr(model, "per_class", False):
        if label is None:
            return None
        labels = label.reshape(-1).tolist() if isinstance(label, (torch.Tensor, np.ndarray)) else (
            list(label) if isinstance(label, (list, tuple)) else [label])
        if len(labels) != n:
            raise DataError(f"{len(labels)} labels for {n} images: pass one class label per image")
        return [plain_label(v) for v in labels]
    if not getattr(model, "conditional", False):
        return None
    if label is None:
        raise DataError(f"this generator is class-conditional ({model.num_classes} classes): pass each image's "
                        "class index with it, aug(img, label), or aug(x, y) for a batch x [B, C, H, W] with "
                        "y a 1-D integer tensor of B class indices")
    labels = label if isinstance(label, (torch.Tensor, np.ndarray, list, tuple)) else [label]
    return class_indices(labels, n, model.num_classes).tolist()
