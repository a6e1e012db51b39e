"""The trainer's data: what it accepts, a fingerprint that a resume checks, and the batches.

``data`` is a tensor ``[N, C, H, W]`` (uint8, or float in [0, 1]), a map-style Dataset of images
or ``(image, label)`` pairs, or a DataLoader. For tensors and Datasets the batch order is a seeded
permutation per epoch that depends only on the seed and the step, so a resumed run sees the same
batches as an uninterrupted one; a DataLoader is iterated as given.

For a class-conditional model (``labels=True``) the items must be ``(image, label)`` pairs (a
``TensorDataset(images, labels)``, a Dataset of pairs, or a DataLoader of them), and every batch is
``(x, y)``, ``y`` the labels as a LongTensor on the device; the fingerprint then covers the labels.
"""
import hashlib
import pickle
import warnings

import numpy as np
import torch
from torch.utils.data import SequentialSampler

from ..errors import DataError
from ..images import collate_images, tensor_unit, to_model
from ..sampling import label_tensor

NO_LABELS = ("this model is class-conditional: it trains on (image, label) pairs. Pass "
             "TensorDataset(images, labels), a Dataset whose items are (image, label), or a DataLoader of them")


def _sample_index(n: int) -> list:
    """The fixed sample of items a fingerprint reads when it cannot read them all."""
    return torch.linspace(0, n - 1, min(32, n), dtype=torch.float64).round().long().unique().tolist()


def _label_bytes(data) -> bytes:
    """The labels of the training data, for the fingerprint of a class-conditional model's data:
    all of them (a dataset's ``targets``, a TensorDataset's second tensor), else those of the
    fingerprint's sample of items."""
    if isinstance(data, (torch.Tensor, torch.utils.data.IterableDataset)):
        return b""
    tensors = getattr(data, "tensors", None)
    labels = getattr(data, "targets", tensors[1] if isinstance(tensors, tuple) and len(tensors) > 1 else None)
    if labels is None:
        with torch.random.fork_rng(devices=[]):   # reading items must not move torch's RNG
            items = [data[i] for i in _sample_index(len(data))]
        labels = [it[1] if isinstance(it, (tuple, list)) and len(it) > 1 else None for it in items]
    labels = (labels.tolist() if isinstance(labels, torch.Tensor)
              else [getattr(y, "tolist", lambda: y)() for y in labels])
    return repr(labels).encode()


def _digest(value) -> str:
    """A stable digest of a sampler's attribute: array-like values by their bytes (a million indices
    stay cheap), a range by its ends, anything else by its pickle, else its repr."""
    if isinstance(value, range):
        return f"range({value.start}, {value.stop}, {value.step})"
    if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
        try:
            arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if arr.dtype != object:
                head = f"{arr.dtype} {arr.shape}".encode()
                return hashlib.sha256(head + np.ascontiguousarray(arr).tobytes()).hexdigest()
        except (ValueError, TypeError):   # ragged lists (per-class index lists), mixed types
            pass
    try:
        return hashlib.sha256(pickle.dumps(value)).hexdigest()
    except Exception:                     # noqa: BLE001 - an unpicklable attribute: its repr is the best we have
        return repr(value)


def _sampler_bytes(loader) -> bytes:
    """What a DataLoader's sampler says about which items it reads: its kind, and its indices,
    weights and sample count where it has them (``SubsetRandomSampler``, ``WeightedRandomSampler``,
    a list, array or range given as the sampler), so that a resume with another subset of the same
    dataset is refused; and the loader's length."""
    parts = []
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if sampler is None:
            continue
        parts.append(type(sampler).__qualname__)
        if isinstance(sampler, (range, list, tuple, np.ndarray, torch.Tensor)):   # indices given as the sampler
            parts.append(f"items={_digest(sampler)}")
        for name in ("indices", "weights", "num_samples", "replacement"):
            value = getattr(sampler, name, None)
            if value is not None:
                parts.append(f"{name}={_digest(value)}")
    try:
        parts.append(f"len={len(loader)}")
    except TypeError:   # an iterable dataset without a length
        pass
    return " ".join(parts).encode()


def _read_sample(data) -> torch.Tensor:
    """The fingerprint's sample of items as the dataset serves them (transforms applied), or an
    empty tensor when it reads differently twice (random transforms that do not use torch's RNG)."""
    idx = _sample_index(len(data))
    reads = []
    for _ in range(2):
        with torch.random.fork_rng(devices=[]):   # torch-seeded transforms read the same twice
            torch.manual_seed(0)
            reads.append(collate_images([data[i] for i in idx]))
    return reads[0] if torch.equal(*reads) else torch.empty(0)


def held_images(data):
    """The tensor holding all the training images, when there is one: the data itself, or a
    dataset's (a DataLoader's dataset's) ``images``; else None."""
    data = data.dataset if isinstance(data, torch.utils.data.DataLoader) else data
    images = data if isinstance(data, torch.Tensor) else getattr(data, "images", None)
    return images if isinstance(images, torch.Tensor) else None


def _update(h, images: torch.Tensor) -> None:
    h.update(f"{tuple(images.shape)} {images.dtype}".encode())
    h.update(images.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())


def data_fingerprint(data, labels: bool = False, sampler: bool = True, legacy: bool = False) -> str:
    """A cheap hash of the training data, kept in the training state so that a resume on other
    data is refused: every byte of a tensor (or of a dataset's ``images`` tensor, and then, if the
    dataset has a ``transform``, the sample below as it reads through it: 32 items read twice, so
    a transform with its own random state is advanced), else a fixed sample of 32 items as read;
    nothing for an iterable dataset, or when the sample reads differently twice (random transforms
    that do not use torch's RNG). For a DataLoader, its dataset's fingerprint and, with ``sampler``
    (the trainer passes it for one process only: under torchrun each rank may hold its own), what
    its sampler says about the items it reads. ``labels=True`` (class-conditional models) also hashes
    the labels. ``legacy``: the fingerprint of dkgm_aug before transforms and samplers counted (a
    DataLoader's dataset, a dataset's ``images`` only), to recognise states written by it. The
    caller adds the length."""
    sampler_part = b""
    if isinstance(data, torch.utils.data.DataLoader):
        data, sampler_part = data.dataset, (_sampler_bytes(data) if sampler and not legacy else b"")
    images = held_images(data)
    h = hashlib.sha256()
    if isinstance(data, torch.utils.data.IterableDataset):
        _update(h, torch.empty(0))
    elif images is not None:
        _update(h, images)
        if getattr(data, "transform", None) is not None and not legacy:   # the same pixels, another pipeline
            _update(h, _read_sample(data))
    else:
        _update(h, _read_sample(data))
    h.update(sampler_part)
    if labels:
        h.update(b"labels " + _label_bytes(data))
    return h.hexdigest()[:16]


def collate_pairs(items) -> tuple:
    """Collate ``(image, label, ...)`` items into ``(images [B, C, H, W] in [0, 1], labels)``."""
    if not all(isinstance(it, (tuple, list)) and len(it) > 1 for it in items):
        raise DataError(f"{NO_LABELS}; got items of type {type(items[0]).__name__}")
    return collate_images(items), label_tensor([it[1] for it in items])


def count_items(data) -> int:
    """The number of training items; refuses data of a kind the trainer does not take."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 4:
            raise DataError(f"a data tensor must be [N, C, H, W], got shape {tuple(data.shape)}")
        n = len(data)
    elif isinstance(data, torch.utils.data.DataLoader):
        n = len(data.dataset)
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        n = len(data)
    else:
        raise DataError(f"data must be a tensor, a map-style Dataset or a DataLoader, got {type(data).__name__}")
    if n == 0:
        raise DataError("the training data is empty")
    return n


class Feed:
    """This rank's batches, as float images in the models' range [-1, 1] on ``device``. Every
    global batch has ``min(batch_size, N)`` items and each of the ``world_size`` ranks takes an
    equal slice (``local_batch`` items); an epoch is ``max(1, N // batch_size)`` steps, or a given
    DataLoader's ``len`` (its own batches)."""

    def __init__(self, data, device, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, labels: bool = False):
        self.data, self.device, self.batch_size, self.seed = data, device, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.n_items = count_items(data)
        self.labels = bool(labels)       # batches are (x, y): for class-conditional models
        if self.labels and isinstance(data, torch.Tensor):
            raise DataError(f"{NO_LABELS}; got a bare image tensor {tuple(data.shape)}")
        self.convert, self.collate = (self.as_pair, collate_pairs) if self.labels else (self.as_batch, collate_images)
        global_batch = min(batch_size, self.n_items)
        self.local_batch = global_batch // world_size
        if self.local_batch < 1:
            raise DataError(f"{self.n_items} training items cannot be split over {world_size} processes")
        if isinstance(data, torch.utils.data.DataLoader):      # batches as the loader makes them
            if world_size > 1 and not isinstance(data.sampler, torch.utils.data.DistributedSampler) and rank == 0:
                warnings.warn("under torch.distributed a DataLoader needs a DistributedSampler, "
                              "or every process trains on the same batches")
        elif global_batch % world_size and rank == 0:
            warnings.warn(f"a batch of {global_batch} does not split evenly over {world_size} processes: "
                          f"each takes {self.local_batch} and the other {global_batch % world_size} are skipped")
        # a DataLoader's epoch is its own batches (its batch size, sampler and drop_last), ours N // batch_size
        self.steps_per_epoch = (max(1, len(data)) if isinstance(data, torch.utils.data.DataLoader)
                                else max(1, self.n_items // batch_size))

    def first(self, k: int):
        """The first ``k`` items (at most), as a batch: the images of the sample grids (with their labels
        when ``labels``)."""
        if isinstance(self.data, torch.Tensor):
            return self.as_batch(self.data[:k])
        if isinstance(self.data, torch.utils.data.DataLoader):
            batch = self.convert(next(iter(self.data)))
            return tuple(b[:k] for b in batch) if self.labels else batch[:k]
        return self.convert(self.collate([self.data[i] for i in range(min(k, len(self.data)))]))

    def as_batch(self, batch) -> torch.Tensor:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            batch = collate_images(batch)
        return to_model(tensor_unit(batch, "training images")).to(self.device, non_blocking=True)

    def as_pair(self, batch) -> tuple:
        """A batch of ``(images, labels)`` as ``(x, y)`` on the device, ``y`` a LongTensor."""
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"{NO_LABELS}; got batches of type {type(batch).__name__}")
        return self.as_batch(batch[0]), label_tensor(batch[1]).to(self.device, non_blocking=True)

    def batches(self, start_step: int, stream: int = 0):
        """Yield this rank's batches from ``start_step`` on, forever; ``stream`` (the stage) seeds the
        workers of a Dataset's loader together with the seed, the epoch and the rank."""
        if isinstance(self.data, torch.utils.data.DataLoader):
            yield from self._loader_batches(start_step)
        step = start_step
        while True:
            epoch, offset = divmod(step, self.steps_per_epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n_items, generator=g)   # the same on every rank: same seed
            lo = self.rank * self.local_batch                  # this rank's slice of each global batch
            plan = [perm[i * self.batch_size:(i + 1) * self.batch_size][lo:lo + self.local_batch]
                    for i in range(offset, self.steps_per_epoch)]
            if isinstance(self.data, torch.Tensor):
                for idx in plan:
                    yield self.as_batch(self.data[idx])
            else:
                # its own generator: the loader draws its workers' base seed from it, not from torch's
                # global RNG, whose state a resumed run restores (an extra draw there would shift it)
                loader = torch.utils.data.DataLoader(self.data, batch_sampler=[i.tolist() for i in plan],
                                                     num_workers=self.num_workers, collate_fn=self.collate,
                                                     generator=torch.Generator().manual_seed(
                                                         ((g.initial_seed() * 1009 + stream) * 1009 + self.rank)
                                                         % 2 ** 63))
                for batch in loader:
                    yield self.convert(batch)
            step += len(plan)

    def _loader_batches(self, start_step: int):
        """A user's DataLoader from ``start_step`` on: a resumed run skips the batches of the current
        epoch that were trained on. The skipped ones are those of this epoch's order only when the
        sampler is sequential or seeded per epoch (``set_epoch``, as ``DistributedSampler``); otherwise
        the rest of the epoch comes from a new shuffle, and the run says so."""
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        sampler = self.data.sampler
        if skip and not hasattr(sampler, "set_epoch") and not isinstance(sampler, SequentialSampler) \
                and self.rank == 0:
            warnings.warn(f"resuming in the middle of an epoch of a DataLoader whose sampler has no set_epoch: "
                          f"the last {self.steps_per_epoch - skip} batches of this epoch come from a new shuffle, "
                          "not the interrupted one's (a DistributedSampler, or a sampler with set_epoch, resumes "
                          "exactly)")
        while True:
            if hasattr(self.data.sampler, "set_epoch"):   # DistributedSampler: reshuffle each epoch
                self.data.sampler.set_epoch(epoch)
            for i, batch in enumerate(self.data):
                if i >= skip:
                    yield self.convert(batch)
            epoch, skip = epoch + 1, 0
