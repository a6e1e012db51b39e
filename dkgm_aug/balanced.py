"""Class-balanced oversampling with DKGM neighbours (docs/design.md, section 5).

:class:`BalancedDKGMDataset` appends synthetic items to a map-style dataset of ``(image, label,
...)`` tuples or dicts until its class counts follow imbalanced-learn's ``sampling_strategy``.
Each synthetic item is a debiased KDE neighbour of a real item of its class. Which real item,
and which noise seed, is fixed in ``__init__`` (the index plan, :mod:`dkgm_aug.sampling`); the
images themselves are made on first access, or in batches by ``precompute()``, and can be kept
in a safetensors cache file (:mod:`dkgm_aug.cache`).
"""
import hashlib
import json
import logging
import operator
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cache as cache_file
from ._validate import check_device, check_int, check_seed
from .bank import bank_for
from .augment import accelerate, check_acceleration, filtered_generate, load_generator, on_device
from .checkpoint import read_metadata, resolve
from .dkgm import check_knobs
from .errors import CheckpointError, DataError, DKGMError
from .images import from_8bit, source_unit, to_uint8
from .kernels import NOISE_SCHEME
from .label_filter import check_label_filter
from .shards import read_folder
from .sampling import (check_class_order, class_names, index_plan, oversampling_targets, plain_label, plan_siblings,
                       read_labels)

__all__ = ["BalancedDKGMDataset", "oversampling_targets"]

logger = logging.getLogger("dkgm_aug")


def _like(q: torch.Tensor, like):
    """The uint8 CHW image ``q`` in the type, dtype and layout of ``like`` (the source image)."""
    if isinstance(like, torch.Tensor):
        out = q.clone() if like.dtype == torch.uint8 else q.to(like.dtype) / 255
        if type(like) is not torch.Tensor:      # a tv_tensors.Image source gets a tv_tensors.Image back
            from torchvision import tv_tensors
            if isinstance(like, tv_tensors.TVTensor):
                return tv_tensors.wrap(out, like=like)
        return out
    hwc = q.permute(1, 2, 0).numpy()
    if isinstance(like, np.ndarray):
        arr = hwc[..., 0] if like.ndim == 2 else hwc
        return arr.copy() if like.dtype == np.uint8 else (arr / np.float32(255)).astype(like.dtype)
    from PIL import Image
    out = Image.fromarray(np.ascontiguousarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc))
    if out.mode == like.mode:
        return out
    if like.mode in ("RGBA", "LA", "La", "RGBa", "PA"):   # the model saw the colours: the source keeps its alpha
        out = out.convert(like.mode.replace("a", "A").replace("PA", "RGBA"))
        out.putalpha(like.getchannel(like.getbands()[-1]))
        return out if out.mode == like.mode else out.convert(like.mode)
    if like.mode == "P":        # the source's own palette: convert("P") would dither to the 216-colour web palette
        return out.convert("RGB").quantize(palette=like, dither=Image.Dither.NONE)
    return from_8bit(out, like.mode)


class BalancedDKGMDataset(torch.utils.data.Dataset):
    """``ds`` plus synthetic DKGM neighbours of its real items, so that class counts follow
    imbalanced-learn's ``sampling_strategy`` (``"auto"``: every class as large as the largest).

    Items ``0 .. n_real - 1`` are ``ds``'s own, unchanged; the synthetic items follow, grouped
    by class. Synthetic item ``j`` starts from a real item of its class chosen by a seeded
    permutation and is generated with noise seed ``seed * 1_000_003 + j``, so two datasets
    with the same arguments hold the same images. A synthetic item is its source item with the
    image replaced: the label and any other fields (``(image, label, extra...)`` tuples, or dicts
    read through ``image_key``/``label_key``) are the source's. Images come back in the type of
    their source (PIL, numpy HWC, uint8 or float tensor), quantized to 256 grey levels, then
    ``transform`` is applied, to real and synthetic items alike. ``cache`` is ``"memory"``,
    ``None``, or a ``.safetensors`` path that ``precompute()`` fills and later runs reload.

    ``label_filter``: a :class:`dkgm_aug.LabelFilter`; each synthetic image its classifier puts in
    another class than its source's label is redrawn with the next seed (labels must be the
    classifier's class indices, or be mapped by the filter's ``class_index``); ``precompute()``
    logs the rejection rate per class, which the filter also keeps (``label_filter.rejection_rate``).

    A class-conditional generator (``DKGM.conditional``) gets each synthetic item's source label as
    its class index, so the labels must be the class indices it was trained with (ints in
    ``[0, num_classes)``; others are refused when generated, not remapped).

    ``bank``: ``None``, or ``k`` (an int) to draw synthetic images from a neighbour bank
    (:mod:`dkgm_aug.bank`) of ``k`` neighbours per source item, made once by ``precompute()`` and kept
    in the ``cache`` file; synthetic item ``j`` shows another of its source's neighbours each epoch
    (``set_epoch``), a function of ``seed``, ``j`` and the epoch. Or a ``NeighbourBank`` made with the
    same generator and knobs whose items include every source item.

    ``dtype=torch.float16`` (needs ``device="cuda"``) and ``compile=True``: as in
    :class:`dkgm_aug.DKGMAugment`, for ``precompute()`` and on-demand generation alike; the cache
    fingerprint records ``dtype`` (fp16 changes pixels by up to one uint8 step), not ``compile``
    (float rounding, like running on another device).

    ``class_values`` are the sorted distinct labels, the keys of ``class_counts``; ``classes``
    are the base dataset's class names when its labels index its ``classes`` (torchvision's
    convention), else the same as ``class_values``.

    >>> ds = BalancedDKGMDataset(train_set, generator="fashion-mnist-tiny", sampling_strategy="auto")  # doctest: +SKIP
    >>> ds.class_counts_before, ds.class_counts                                                       # doctest: +SKIP
    >>> loader = DataLoader(ds.precompute(), batch_size=128, shuffle=True, num_workers=4)             # doctest: +SKIP
    """

    def __init__(self, ds, generator, sampling_strategy="auto", alpha=None, steps=None, transform=None,
                 seed: int = 0, cache="memory", device=None, convert_channels: bool = False,
                 progress: bool = True, labels=None, image_key="image", label_key="label", label_filter=None,
                 bank=None, dtype=None, compile: bool = False):
        self.alpha, self.steps = check_knobs(alpha=alpha), check_knobs(steps=steps)   # it checks one per call
        self.seed, self.device = check_seed(seed), check_device(device)
        self.dtype, self.compile = check_acceleration(dtype, compile, self.device)
        self.label_filter = check_label_filter(label_filter)
        if isinstance(generator, (str, os.PathLike)):
            read_metadata(resolve(generator))   # a wrong name or path fails here, not in a worker
            self.generator, self._model = os.fspath(generator), None   # loaded on first use
        elif isinstance(generator, torch.nn.Module):
            self.generator, self._model = load_generator(generator, self.device), None   # cast/compiled on first use
        else:
            raise DKGMError(f"generator must be a shipped name, a checkpoint path or a model, "
                            f"got {type(generator).__name__}")
        if not (cache is None or cache == "memory" or str(cache).endswith(".safetensors")):
            raise DKGMError(f"cache must be 'memory', None or a path ending in .safetensors, got {cache!r}")
        self.ds, self.transform, self.convert_channels = ds, transform, bool(convert_channels)
        self.image_key, self.label_key = image_key, label_key
        self.cache = Path(cache) if cache not in (None, "memory") else cache
        self.sampling_strategy = sampling_strategy

        self.class_values, real_codes = read_labels(ds, labels, self._label, progress)
        self._labels_given = labels is not None
        self.classes = class_names(ds, self.class_values, given=self._labels_given) or self.class_values
        counts = np.bincount(real_codes.numpy(), minlength=len(self.class_values)).tolist()
        self.class_counts_before = dict(zip(self.class_values, counts))
        y = np.asarray(self.class_values)[real_codes.numpy()] if callable(sampling_strategy) else None
        n_new = oversampling_targets(sampling_strategy, self.class_counts_before, y)
        self.class_counts = {c: n + n_new.get(c, 0) for c, n in self.class_counts_before.items()}
        self._codes, self._sources = index_plan(real_codes, [n_new.get(c, 0) for c in self.class_values], self.seed)
        self._plan = (counts, [n_new.get(c, 0) for c in self.class_values])   # per class: real, synthetic items
        self.n_real, self.n_synthetic = len(real_codes), len(self._sources)

        self._cache = {}   # synthetic index -> uint8 CHW image
        # Per synthetic image, a digest of its source image, and whether that digest was compared
        # with the source read here (made lazily: a labels-only wrap of millions of items stays small);
        # digests not compared yet came from the cache file at _cache_path.
        self._digests = self._checked = self._cache_path = None
        self._cache_file_ok = self._warned = self._stable_checked = False
        # bank mode (dkgm_aug/bank.py): synthetic images come from a neighbour bank, one per epoch
        self.bank, self._epoch = bank_for(self, bank), torch.zeros((), dtype=torch.int64)
        if self.bank is not None:
            self._epoch.share_memory_()   # so that set_epoch reaches persistent DataLoader workers
        elif isinstance(self.cache, Path):
            self._open_cache_file()

    def _open_cache_file(self):
        cache_file.check_path(self.cache)
        if self.cache.exists():
            try:
                self.load_cache(self.cache)
            except CheckpointError as exc:
                warnings.warn(f"{exc}; ignoring it, precompute() will rebuild it", stacklevel=3)
        if not self._cache_file_ok:
            cache_file.check_writable(self.cache)   # now, not after generating every image

    # -- the index plan ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_real + self.n_synthetic

    def _index(self, i) -> int:
        i, n = operator.index(i), len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for a dataset of {n} items")
        return i % n

    def is_synthetic(self, i) -> bool:
        return self._index(i) >= self.n_real

    def source_index(self, i) -> int:
        """The real item a synthetic item was generated from (a real item's own index)."""
        i = self._index(i)
        return i if i < self.n_real else int(self._sources[i - self.n_real])

    def noise_seed(self, j: int) -> int:
        """Noise seed of synthetic item ``j`` (counted from 0 among the synthetic items)."""
        return (self.seed * 1_000_003 + j) % 2 ** 63

    def set_epoch(self, epoch: int) -> None:
        """With ``bank``: show each synthetic item's neighbour of epoch ``epoch`` (call it before each
        epoch, like ``DistributedSampler.set_epoch``; persistent workers see it too). Else no effect."""
        self._epoch.fill_(check_int("epoch", epoch, 0))

    @property
    def targets(self) -> list:
        """The label value of every item, synthetic ones included (built on each access)."""
        return [self.class_values[k] for k in self._codes.tolist()]

    @property
    def n_generated(self) -> int:
        """How many synthetic images are made (or read from the cache file) so far; with ``bank``,
        the neighbours the bank holds (``k`` per source item, 0 until it is built)."""
        if self.bank is not None:
            return len(self.bank) * self.bank.k if self.bank.built else 0
        return len(self._cache)

    # -- items: (image, label, ...) tuples or dicts -------------------------------------------------
    def _field(self, item, key, index):
        if isinstance(item, Mapping):
            if key not in item:
                name = "image_key" if index == 0 else "label_key"
                raise DataError(f"dataset items are dicts without the key {key!r} (their keys: {list(item)}); "
                                f"pass {name}= naming the right one")
            return item[key]
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            return item[index]
        raise DataError(f"dataset items must be (image, label, ...) tuples or dicts, got {type(item).__name__}")

    def _image(self, item):
        return self._field(item, self.image_key, 0)

    def source_image(self, j: int):
        """The source image of synthetic item ``j`` (counted among the synthetic items), as its item holds it."""
        return self._image(self.ds[int(self._sources[j])])

    def source_digest(self, j: int) -> bytes:
        """The :func:`dkgm_aug.cache.digest` of synthetic item ``j``'s source image."""
        return cache_file.digest(source_unit(self.source_image(j)))

    def _label(self, item):
        return self._field(item, self.label_key, 1)

    def _replace(self, item, image):
        """``item`` with its image replaced, every other field kept."""
        if isinstance(item, Mapping):
            return {**item, self.image_key: image}
        return [image, *item[1:]] if isinstance(item, list) else (image, *item[1:])

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices) -> list:
        """Items ``indices`` as a list, generating the synthetic ones not cached yet in one batch.
        ``DataLoader`` calls this with a whole batch of indices, so on-demand generation is
        batched too; each image still gets its own noise seed, so it does not depend on which
        other items share its batch."""
        idx = [self._index(i) for i in indices]
        sources = {i - self.n_real: self.ds[int(self._sources[i - self.n_real])] for i in idx if i >= self.n_real}
        images = {j: self._image(item) for j, item in sources.items()}
        self._check_labels(sources)
        if self.bank is not None:
            js = list(images)
            rank, siblings = plan_siblings(js, self._codes[[self.n_real + j for j in js]].numpy(), *self._plan)
            made = self.bank.pick({j: int(self._sources[j]) for j in js}, images, self.seed, int(self._epoch),
                                  rank, siblings)
        else:
            self._check_sources({j: image for j, image in images.items() if j in self._cache})
            todo = [j for j in images if j not in self._cache]
            made = self._on_demand(todo, [images[j] for j in todo]) if todo else {}
        items = []
        for i in idx:
            if i < self.n_real:
                item = self.ds[i]
                self._check_label(i, item, f"item {i}")
            else:
                j = i - self.n_real
                item = self._replace(sources[j], _like(made[j] if j in made else self._cache[j], images[j]))
            items.append(item if self.transform is None else self._replace(item, self.transform(self._image(item))))
        return items

    def _check_labels(self, sources: dict) -> None:
        """A synthetic item is served under its source item's label: that label must still be the
        class it was planned for (labels read from ``.targets`` may differ from the items' own)."""
        for j, item in sources.items():
            self._check_label(self.n_real + j, item, f"item {int(self._sources[j])} (the source of synthetic item "
                                                     f"{self.n_real + j})")

    def _check_label(self, i: int, item, what: str) -> None:
        """Item ``i`` of this dataset (``item``, as read) must read the label the balance was planned
        with: stored labels (``.targets``) are trusted after spot checks, so an item whose ``__getitem__``
        relabels it (label cleaning that leaves ``.targets`` stale) unbalanced the classes with no word.
        One label read per item served."""
        if self._labels_given:
            return
        planned = self.class_values[int(self._codes[i])]
        label = plain_label(self._label(item))
        if label != planned:
            raise DataError(f"{what} reads label {label!r}, but the classes were balanced with it in class "
                            f"{planned!r} (labels read when the dataset was wrapped, from its stored labels "
                            "(.targets) when it has them): its __getitem__ changes labels, or they changed since; "
                            "pass labels= with the items' own labels, or update .targets and wrap it again")

    def _on_demand(self, js: list, images: list) -> dict:
        if not self._warned and torch.utils.data.get_worker_info() is not None:
            self._warned = True
            warnings.warn("BalancedDKGMDataset is generating synthetic images in a DataLoader worker: each worker "
                          "keeps its own, lost when it exits (every epoch unless persistent_workers=True), so they "
                          "are generated again and again; call precompute() before building the DataLoader",
                          stacklevel=2)
        if self.cache is not None:          # kept: made once from one view
            self._check_stable_sources()
        qs, digests = self._make(js, images, self._generator())
        if self.cache is not None:
            self._keep(js, qs, digests)
        return dict(zip(js, qs))

    def _make(self, js: list, images: list, model):
        """Synthetic images ``js`` (from source ``images``) as uint8 CHW tensors, generated in one
        batch per image size, and the digests of their sources."""
        xs = [source_unit(image) for image in images]
        out = [None] * len(js)
        for shape in dict.fromkeys(tuple(x.shape) for x in xs):
            ks = [k for k, x in enumerate(xs) if tuple(x.shape) == shape]
            made = filtered_generate(model, torch.stack([xs[k] for k in ks]), [self.noise_seed(js[k]) for k in ks],
                                     self.alpha, self.steps, self.convert_channels,
                                     labels=self._labels([js[k] for k in ks]), label_filter=self.label_filter)
            for k, q in zip(ks, to_uint8(made)):
                out[k] = q
        return out, [cache_file.digest(x) for x in xs]

    def _keep(self, js: list, qs: list, digests: list) -> None:
        if self._digests is None:
            self._digests = torch.zeros(self.n_synthetic, cache_file.DIGEST_BYTES, dtype=torch.uint8)
            self._checked = torch.zeros(self.n_synthetic, dtype=torch.bool)
        self._cache.update(zip(js, qs))
        self._digests[js] = cache_file.digest_rows(digests)
        self._checked[js] = True

    def _check_sources(self, images: dict) -> None:
        """Compare the sources of images read from a cache file with the digests saved beside them.
        Lazily, each when first served: checking them all at load would read every source image
        once, a whole pass over the base dataset before the first batch; here it costs one digest
        of an image that is read anyway (``load_cache`` checks the first one at once)."""
        for j, image in images.items():
            if self._checked[j]:
                continue
            if cache_file.digest(source_unit(image)) != bytes(self._digests[j].numpy()):
                raise DKGMError(f"cache file {self._cache_path} was made from other images (source item "
                                f"{self.source_index(self.n_real + j)} differs); delete it or pass a new cache "
                                "path (if the base dataset applies random transforms, move them to transform=)")
            self._checked[j] = True

    def _check_stable_sources(self) -> None:
        """Warn, before the first neighbour is made, when the base dataset serves another image each
        time it reads one source (a random transform set on it): each synthetic item would be the
        neighbour of one random view, kept for every epoch, while real items get a new view on every
        read. (A cache file or a bank refuses such data when it reopens; in memory it went through.)
        Up to five reads of the first source (a coin-flip transform gives the same view twice in a
        row half the time), outside torch's random stream; once per dataset object, before images are
        kept (``cache=None`` keeps none, so each read is a neighbour of a fresh view: no warning)."""
        if not self.n_synthetic or self._stable_checked:
            return
        self._stable_checked = True
        with torch.random.fork_rng(devices=[]):
            first = cache_file.digest(source_unit(self.source_image(0)))
            varies = any(cache_file.digest(source_unit(self.source_image(0))) != first for _ in range(4))
        if varies:
            warnings.warn(f"the base dataset served two different images for item {self.source_index(self.n_real)} "
                          "(a random transform on it?): each synthetic item is made once from one random view and "
                          "kept for every epoch, while the real items change on every read; move random transforms "
                          "from the base dataset to BalancedDKGMDataset(transform=...), which applies them to real and "
                          "synthetic items alike", stacklevel=4)

    def _labels(self, js) -> list:
        """The class labels of synthetic items ``js``, for generators that condition on them."""
        return [self.class_values[int(self._codes[self.n_real + j])] for j in js]

    def _generator(self, device=None):
        if self._model is None:
            model = load_generator(self.generator, self.device)
            if not self._labels_given:      # labels= are the user's class indices: nothing to compare
                check_class_order(model, self.ds)
            self._model = accelerate(model, self.dtype, self.compile)
        return on_device(self._model, device, self.generator)

    def precompute(self, batch_size: int = 256, device=None, progress: bool = True):
        """Generate every synthetic image not made yet, ``batch_size`` at a time on ``device``
        (default: the dataset's), with the same per-image seeds as on-demand access. Keeps
        them in memory (even with ``cache=None``) and writes the cache file if one was given.
        With ``bank``: builds the bank instead (and writes it to the cache file)."""
        if self.bank is not None:
            self.bank.build(batch_size, device, progress)
            return self
        todo = [j for j in range(self.n_synthetic) if j not in self._cache]
        check_acceleration(self.dtype, self.compile, check_device(device) or self.device)
        if todo:
            self._check_stable_sources()
        model = self._generator(check_device(device))
        with tqdm(total=len(todo), desc="generating", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                js = todo[start:start + batch_size]
                images = [self.source_image(j) for j in js]
                self._keep(js, *self._make(js, images, model))
                bar.update(len(js))
        if self.label_filter is not None and todo:
            logger.info(self.label_filter.summary())
            if progress:
                tqdm.write(self.label_filter.summary())
        if isinstance(self.cache, Path) and (todo or not self._cache_file_ok):
            self.save_cache(self.cache)
        return self

    # -- cache file -------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What the synthetic images depend on besides the source images (whose digests the
        cache file keeps per image); a cache file is used only if this matches."""
        name, generator_hash = cache_file.generator_digest(self.generator)
        plan = torch.cat([self._sources.long(), self._codes[self.n_real:].long()]).numpy()
        fp = dict(format=cache_file.FORMAT, seed=self.seed, n_real=self.n_real, n_synthetic=self.n_synthetic,
                  counts_before=[[repr(c), n] for c, n in self.class_counts_before.items()],
                  counts_after=[[repr(c), n] for c, n in self.class_counts.items()],
                  plan_sha256=hashlib.sha256(plan.tobytes()).hexdigest(), generator=name,
                  generator_sha256=generator_hash, alpha=self.alpha, steps=self.steps,
                  convert_channels=bool(self.convert_channels), noise_scheme=NOISE_SCHEME,
                  dtype=None if self.dtype is None else str(self.dtype).removeprefix("torch."),
                  label_filter=None if self.label_filter is None else self.label_filter.fingerprint())
        return json.loads(json.dumps(fp))

    def save_cache(self, path) -> None:
        """Write every synthetic image (uint8) and its source's digest to one safetensors file,
        atomically; refuses to replace a cache that another writer made for another plan."""
        self._refuse_in_bank_mode("save_cache")
        missing = self.n_synthetic - len(self._cache)
        if missing:
            raise DKGMError(f"{missing} of {self.n_synthetic} synthetic images are not generated yet; "
                            "call precompute() before save_cache()")
        try:
            images = (torch.stack([self._cache[j] for j in range(self.n_synthetic)]) if self.n_synthetic
                      else torch.zeros(0, dtype=torch.uint8))
        except RuntimeError:
            raise DataError("synthetic images differ in size, so they cannot be saved as one tensor; "
                            "resize the base dataset's images") from None
        digests = self._digests if self.n_synthetic else torch.zeros(0, cache_file.DIGEST_BYTES, dtype=torch.uint8)
        cache_file.write(path, images, digests, self.fingerprint())
        self._cache_file_ok = self._cache_file_ok or Path(path) == self.cache

    def _refuse_in_bank_mode(self, call: str) -> None:
        if self.bank is not None:
            raise DKGMError(f"{call}() serves the synthetic images of a dataset without bank=; with bank= they are "
                            "the neighbour bank's: precompute() writes the bank to cache= (a .safetensors file or "
                            "a folder) and reopens it from there")

    def load_cache(self, path):
        """Read images written by ``save_cache``: a file for another plan raises DKGMError, a
        truncated or corrupt one CheckpointError. Their sources are compared with the digests
        saved beside them as they are served (the first one now)."""
        self._refuse_in_bank_mode("load_cache")
        if Path(path).is_dir():   # a folder of shards written by dkgm-aug precompute (dkgm_aug/shards.py)
            images, digests = read_folder(path, "balanced", self.fingerprint(), self.n_synthetic)
        else:
            images, digests = cache_file.read(path, self.fingerprint())
        self._cache.update(enumerate(images))
        self._digests, self._checked = digests.clone(), torch.zeros(self.n_synthetic, dtype=torch.bool)
        self._cache_path = path
        if self.n_synthetic:
            self._check_sources({0: self.source_image(0)})
        self._cache_file_ok = self._cache_file_ok or Path(path) == self.cache
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        if state["_model"] is not self.generator:
            state["_model"] = None   # workers reload (and cast/compile) it: keeps the pickle small
        return state
