"""Neighbour banks: ``k`` DKGM neighbours per source image, made once, drawn from every epoch.

Online augmentation pays for a generator call on every epoch; a bank pays once. Its rows hold
``k`` neighbours of each source item, made in batches on the device by the one generation path
(:func:`dkgm_aug.augment.filtered_generate`), neighbour ``r`` of item ``i`` from the noise seed
:func:`neighbour_seed` ``(seed, i, r)`` (independent of ``k``: a bank of 8 starts with the bank of
4). Kept in memory, in one ``.safetensors`` file, or in a folder of shards (``dkgm-aug precompute``,
:mod:`dkgm_aug.shards`), reopened when its fingerprint (generator, knobs, seed, ``k``, items)
matches, memory-mapped read-only so that DataLoader workers and epochs share one copy. Two uses:

* :class:`dkgm_aug.BankAugment` (:mod:`dkgm_aug.bank_augment`): a transform that replaces an image, with
  probability ``p``, by one of its ``k`` neighbours. It finds the image's row by a digest of its
  pixels, so it must see the images the bank was made from (put it first in the pipeline);
* ``BalancedDKGMDataset(..., bank=k)``: synthetic items that change each epoch (``set_epoch``).

>>> bank = NeighbourBank(train_set, "fashion-mnist-tiny", k=8, path="bank.safetensors").build()  # doctest: +SKIP
>>> train_set.transform = BankAugment(bank, p=0.5, seed=0)                                        # doctest: +SKIP
"""
import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cache as cache_file
from . import shards
from ._validate import check_device, check_int, check_seed
from .augment import accelerate, check_acceleration, filtered_generate, load_generator, on_device
from .checkpoint import read_metadata, resolve
from .dkgm import check_knobs
from .errors import CheckpointError, DataError, DKGMError
from .images import source_unit, to_uint8
from .kernels import NOISE_SCHEME
from .label_filter import check_label_filter
from .sampling import check_class_order
from .sampling import plain_label, stored_labels, stored_match

__all__ = ["NeighbourBank", "neighbour_seed"]
logger = logging.getLogger("dkgm_aug")

FORMAT = 1
MAX_K = 4096


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def mix(*parts) -> np.ndarray:
    """A 64-bit hash of non-negative integers (arrays broadcast): the bank's only randomness."""
    with np.errstate(over="ignore"):
        h = np.zeros(np.broadcast(*[np.asarray(p) for p in parts]).shape, dtype=np.uint64)
        for p in parts:
            h = _splitmix(h ^ np.asarray(p, dtype=np.uint64))
    return h


def neighbour_seed(seed: int, index: int, r: int) -> int:
    """Noise seed of neighbour ``r`` of item ``index`` in a bank seeded ``seed``, in [0, 2**63)."""
    return int(mix(seed, index, r) >> np.uint64(1))


def _field(item, key, index):
    """An item's image (``index`` 0) or label (1): ``(image, label, ...)``, a dict, or a bare image (no label)."""
    if isinstance(item, Mapping):
        if key not in item:
            raise DataError(f"dataset items are dicts without the key {key!r} (their keys: {list(item)}); "
                            f"pass {'image_key' if index == 0 else 'label_key'}= naming the right one")
        return item[key]
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[index]
    return item if index == 0 else None


def _indices(ds, indices) -> torch.Tensor:
    n = len(ds)
    idx = torch.arange(n) if indices is None else torch.as_tensor(indices).flatten()
    if idx.dtype not in (torch.int16, torch.int32, torch.int64, torch.uint8) or not len(idx):
        raise DataError(f"a bank needs at least one item: indices must be item indices of the dataset "
                        f"({n} items), got {indices!r:.80}")
    idx = torch.unique(idx.long())           # sorted, distinct: row r is item idx[r]
    if idx[0] < 0 or idx[-1] >= n:
        raise DataError(f"indices must lie in [0, {n}) (the dataset's items), got {int(idx[0])} .. {int(idx[-1])}")
    return idx


def _bank_path(path):
    if path is None:
        return None
    path = Path(path)
    if path.suffix == ".safetensors":
        cache_file.check_path(path)
    elif path.exists() and not path.is_dir():
        raise DKGMError(f"bank path {os.fspath(path)!r} is a file without .safetensors: pass a .safetensors "
                        "file, or a folder for shards")
    return path


class NeighbourBank:
    """``k`` neighbours of each item of ``ds`` (of ``indices`` only, if given), made once.

    ``generator``, ``alpha``, ``steps``, ``convert_channels``, ``label_filter``, ``dtype`` and
    ``compile`` as in ``BalancedDKGMDataset``; items are ``(image, label, ...)`` tuples, dicts (``image_key``,
    ``label_key``) or bare images. ``path``: ``None`` (in memory), a ``.safetensors`` file, or a
    folder of shards; an existing bank there is opened if it was made with the same settings
    (else DKGMError), and ``build()`` makes whatever is missing (a folder resumes shard by shard).
    The bank must be built before a DataLoader forks: workers never generate.
    """

    def __init__(self, ds, generator, k: int = 4, *, indices=None, alpha=None, steps=None, seed: int = 0,
                 path=None, device=None, convert_channels: bool = False, label_filter=None,
                 image_key="image", label_key="label", dtype=None, compile: bool = False, labels=None):
        self.k = check_int("k (neighbours per image)", k, 1, MAX_K)
        self.alpha, self.steps = check_knobs(alpha=alpha), check_knobs(steps=steps)
        self.seed, self.device = check_seed(seed), check_device(device)
        self.dtype, self.compile = check_acceleration(dtype, compile, self.device)
        self.label_filter, self.convert_channels = check_label_filter(label_filter), bool(convert_channels)
        if isinstance(generator, (str, os.PathLike)):
            read_metadata(resolve(generator))       # a wrong name or path fails here
            self.generator, self._model = os.fspath(generator), None
        elif isinstance(generator, torch.nn.Module):
            self.generator, self._model = load_generator(generator, self.device), None   # cast/compiled on first use
        else:
            raise DKGMError(f"generator must be a shipped name, a checkpoint path or a model, "
                            f"got {type(generator).__name__}")
        self.ds, self.image_key, self.label_key = ds, image_key, label_key
        self.indices, self.path = _indices(ds, indices), _bank_path(path)
        if labels is not None and len(labels) != len(ds):
            raise DataError(f"labels= gives {len(labels)} labels for a dataset of {len(ds)} items: one per item")
        self._given_labels = labels
        self._fp = self._store = self._images = self._sources = self._counts = self._by_digest = self._checked = None
        self._row_labels = self._labels_matter = None
        if self.path is not None and self.path.exists():
            self._open()

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def built(self) -> bool:
        return self._store is not None or self._images is not None

    def fingerprint(self) -> dict:
        """What the rows depend on besides the source pixels (whose digests the file keeps per row)."""
        if self._fp is None:
            name, sha = cache_file.generator_digest(self.generator)
            fp = dict(format=FORMAT, kind="bank", k=self.k, seed=self.seed, n_rows=len(self),
                      indices_sha256=hashlib.sha256(self.indices.numpy().tobytes()).hexdigest(),
                      generator=name, generator_sha256=sha, alpha=self.alpha, steps=self.steps,
                      convert_channels=self.convert_channels, noise_scheme=NOISE_SCHEME,
                      dtype=None if self.dtype is None else str(self.dtype).removeprefix("torch."),
                      label_filter=None if self.label_filter is None else self.label_filter.fingerprint())
            if self.uses_labels:      # the rows depend on each source's class: a relabelled dataset is another bank
                text = json.dumps([repr(y) for y in self.row_labels()])
                fp["labels_sha256"] = hashlib.sha256(text.encode()).hexdigest()
            self._fp = json.loads(json.dumps(fp))
        return self._fp

    @property
    def uses_labels(self) -> bool:
        """Whether the rows depend on the sources' labels: a label filter, or a generator that takes
        them (class-conditional, or a per-class kernel-smoothed score)."""
        if self._labels_matter is None:      # read once: make_rows asks for every shard
            if self.label_filter is not None:
                self._labels_matter = True
            elif self._model is None and isinstance(self.generator, str):   # the checkpoint's config, not loaded
                cfg = read_metadata(resolve(self.generator))["config"]
                self._labels_matter = (any(isinstance(v, dict) and v.get("num_classes") for v in cfg.values())
                                       or bool(cfg.get("classes")))
            else:
                model = self._generator()
                self._labels_matter = bool(getattr(model, "conditional", False) or getattr(model, "per_class", False))
        return self._labels_matter

    def row_labels(self) -> list:
        """Each row's source label, as its neighbours are made with it: from ``labels=`` when given,
        else the dataset's stored labels when they are the items' own (as ``BalancedDKGMDataset``
        reads them), else read from the items (one pass, once); None for items without a label."""
        if self._row_labels is None:
            label_of = lambda item: _field(item, self.label_key, 1)   # noqa: E731
            stored = None if self._given_labels is not None else stored_labels(self.ds)
            if self._given_labels is not None:
                got = [self._given_labels[i] for i in self.indices.tolist()]
            elif stored is not None and stored_match(self.ds, stored, label_of):   # no image loaded
                got = [stored[i] for i in self.indices.tolist()]
            else:
                got = [label_of(self.ds[i]) for i in tqdm(
                    self.indices.tolist(), desc="bank: reading labels", disable=len(self) < 10_000)]
            self._row_labels = [None if y is None else plain_label(y) for y in got]
        return self._row_labels

    def _open(self) -> None:
        if self.path.is_dir() and not shards.folder_complete(self.path, "bank", self.fingerprint()):
            return                        # a stopped precompute: build() finishes it
        try:
            self._store = shards.Store(self.path, "bank", self.fingerprint(), len(self))
        except CheckpointError as exc:
            warnings.warn(f"{exc}; ignoring it, build() will make the bank again", stacklevel=3)
            return
        # the fingerprint holds no pixels: the first row's source against the data, at once (each row's
        # is checked when served by BalancedDKGMDataset, BankAugment finds images by their pixels); one
        # image read. A warning: a dataset whose transform already holds BankAugment reads changed pixels
        if len(self) and self.ds is not None and bytes(self._store.sources[0].numpy()) != self.source_digest(0):
            warnings.warn(f"the neighbour bank {self.path} was made from other images than the dataset's (row 0's "
                          "source differs): the data changed since it was made, or the dataset's transform changes "
                          "its images; delete the bank if the data changed", stacklevel=3)

    # -- making rows ---------------------------------------------------------------------------------
    def _generator(self, device=None):
        if self._model is None:
            model = load_generator(self.generator, self.device)
            if self._given_labels is None:  # labels= are the user's class indices: nothing to compare
                check_class_order(model, self.ds)
            self._model = accelerate(model, self.dtype, self.compile)
        return on_device(self._model, device, self.generator)

    def make_rows(self, start: int, stop: int, model, batch_size: int = 256, bar=None) -> tuple:
        """``(images [n, k, C, H, W] uint8, source digests [n, 16], filter counts)`` of rows
        ``start .. stop - 1``, about ``batch_size`` images per generator call. Depends on nothing but
        the rows. The counts are what the label filter drew, rejected and ran out of tries on for
        these rows (:meth:`filter_counts`), None without a filter."""
        before = _counts(self.label_filter)
        if self.ds is None:
            raise DKGMError("this bank was copied without its dataset (into a DataLoader worker?) and cannot make "
                            "rows; build() it before the DataLoader starts")
        idx, parts, digests = self.indices[start:stop].tolist(), [], []
        row_labels = self.row_labels() if self.uses_labels else None
        per_call = max(1, batch_size // self.k)
        for b in range(0, len(idx), per_call):
            rows = idx[b:b + per_call]
            items = [self.ds[i] for i in rows]
            xs = [source_unit(_field(it, self.image_key, 0)) for it in items]
            if len({tuple(x.shape) for x in xs} | {tuple(p.shape[2:]) for p in parts[:1]}) > 1:
                raise DataError("the bank's source images differ in size; resize them to one size first")
            labels = [None] * len(rows) if row_labels is None else row_labels[start + b:start + b + len(rows)]
            made = [None] * len(rows)
            # rows with a label and rows without one go to separate calls: a row's neighbours depend on
            # its own label only (one unlabelled item stripped the labels of its whole call)
            groups = ([j for j, y in enumerate(labels) if y is not None], [j for j, y in enumerate(labels) if y is None])
            for group in groups:
                if not group:
                    continue
                seeds = [neighbour_seed(self.seed, rows[j], r) for j in group for r in range(self.k)]
                given = None if labels[group[0]] is None else [labels[j] for j in group for _ in range(self.k)]
                out = filtered_generate(model, torch.stack([xs[j] for j in group]).repeat_interleave(self.k, 0), seeds,
                                        self.alpha, self.steps, self.convert_channels, labels=given,
                                        label_filter=self.label_filter)
                for n, j in enumerate(group):
                    made[j] = out[n * self.k:(n + 1) * self.k]
            made = torch.cat(made)
            parts.append(to_uint8(made).cpu().view(len(rows), self.k, *made.shape[1:]))
            digests += cache_file.batch_digests(torch.stack(xs))
            if bar is not None:
                bar.update(len(rows))
        after = _counts(self.label_filter)
        counts = None if after is None else {
            key: {str(c): n - before[key].get(c, 0) for c, n in sorted(after[key].items()) if n > before[key].get(c, 0)}
            for key in after}
        return torch.cat(parts), cache_file.digest_rows(digests), counts

    def build(self, batch_size: int = 256, device=None, progress: bool = True, shard_size: int = 4096):
        """Make every row not made yet, ``batch_size`` images per generator call on ``device`` (default:
        the bank's), and write them to ``path``: a ``.safetensors`` file at once, a folder shard by shard
        (``shard_size`` rows each; a rerun skips finished shards). Returns the bank."""
        if self.built:
            return self
        batch_size = check_int("batch_size", batch_size, 1)
        model = self._generator(check_device(device))
        if self.path is not None and self.path.suffix != ".safetensors":
            shards.write_shards(self.path, "bank", self.fingerprint(), len(self), shard_size,
                                lambda a, b: self.make_rows(a, b, model, batch_size), progress=progress,
                                source_digest=self.source_digest)
        else:
            with tqdm(total=len(self), desc=f"bank: {self.k} neighbours per image", disable=not progress) as bar:
                images, sources, counts = self.make_rows(0, len(self), model, batch_size, bar)
            if self.path is None:
                self._images, self._sources, self._counts = images, sources, counts
                return self._log_filter()
            if self.path.exists():        # a damaged bank is replaced, another program's file refused
                with contextlib.suppress(CheckpointError):
                    shards._layout(self.path)
            shards.write_shard(self.path, images, sources, self.fingerprint(), 0, len(self), counts)
        self._store = shards.Store(self.path, "bank", self.fingerprint(), len(self))
        return self._log_filter()

    def _log_filter(self) -> "NeighbourBank":
        """Log the label filter's rejection rate per class over the rows this build made (a bank
        reopened from its file made none; ``bank.label_filter.rejection_rate`` keeps the figures)."""
        if self.label_filter is not None and self.label_filter.drawn:
            logger.info("neighbour bank: %s", self.label_filter.summary())
        return self

    @property
    def filter_counts(self):
        """Per class index, over every row of the bank: ``{"drawn": {c: n}, "rejected": {c: n},
        "exhausted": {c: n}}``, what the label filter drew, rejected, and the images whose tries ran
        out; read back from the bank's files when it was reopened. None without a label filter, before
        ``build()``, or for a bank whose files were written before banks kept the counts."""
        if self.label_filter is None or not self.built:
            return None
        parts = [self._counts] if self._store is None else self._store.stats()
        if any(p is None for p in parts):
            return None
        total = {"drawn": {}, "rejected": {}, "exhausted": {}}
        for part in parts:
            for key, per_class in part.items():
                for c, n in per_class.items():
                    total[key][int(c)] = total[key].get(int(c), 0) + n
        return {key: dict(sorted(v.items())) for key, v in total.items()}

    def _ensure_built(self) -> None:
        if not self.built:
            if torch.utils.data.get_worker_info() is not None:
                raise DKGMError("the neighbour bank is not built and a DataLoader worker would build its own copy; "
                                "call build() (or BalancedDKGMDataset.precompute()) before creating the DataLoader")
            self.build()

    # -- lookups -------------------------------------------------------------------------------------
    @property
    def sources(self) -> torch.Tensor:
        """``[rows, 16]`` digests of the source images, row by row."""
        self._ensure_built()
        return self._store.sources if self._store is not None else self._sources

    def neighbour(self, row: int, r: int) -> torch.Tensor:
        """Neighbour ``r`` of row ``row``, a uint8 CHW tensor."""
        self._ensure_built()
        if self._store is not None:
            return torch.from_numpy(np.array(self._store.row(row)[r]))
        return self._images[row, r]

    def source_image(self, row: int):
        """The source image of row ``row`` in the dataset at hand (as the item holds it)."""
        return _field(self.ds[int(self.indices[row])], self.image_key, 0)

    def source_digest(self, row: int) -> bytes:
        """The :func:`dkgm_aug.cache.digest` of row ``row``'s source image in the dataset at hand."""
        return cache_file.digest(source_unit(self.source_image(row)))

    def row_of_index(self, index: int) -> int:
        """The row of dataset item ``index``."""
        row = int(np.searchsorted(self.indices.numpy(), index))
        if row >= len(self.indices) or int(self.indices[row]) != index:
            raise DKGMError(f"the bank holds no neighbours of item {index}; build it over that item (indices=)")
        return row

    def row_of_digest(self, digest: bytes):
        """The (first) row whose source image has this :func:`dkgm_aug.cache.digest`, or None."""
        rows = self.rows_of_digest(digest)
        return rows[0] if rows else None

    def rows_of_digest(self, digest: bytes) -> list:
        """Every row whose source image has this digest: identical images are several rows, which
        differ when they have different labels and the bank's rows depend on labels."""
        if self._by_digest is None:
            self._by_digest = {}
            for r, d in enumerate(self.sources.numpy()):
                self._by_digest.setdefault(bytes(d), []).append(r)
        return self._by_digest.get(digest, [])

    def check_source(self, row: int, image) -> None:
        """Refuse a source image other than the one row ``row`` was made from (checked once per row)."""
        if self._checked is None:
            self._checked = torch.zeros(len(self), dtype=torch.bool)
        if not self._checked[row]:
            if cache_file.digest(source_unit(image)) != bytes(self.sources[row].numpy()):
                raise DKGMError(f"the neighbour bank {self.path or '(in memory)'} was made from other images (item "
                                f"{int(self.indices[row])} differs); delete it or pass another path (if the dataset "
                                "applies a random transform, BankAugment included, read the sources from a "
                                "copy without it and put the transform in transform=)")
            self._checked[row] = True

    def pick(self, sources: dict, images: dict, seed: int, epoch: int, ranks, siblings) -> dict:
        """For ``BalancedDKGMDataset``: synthetic item ``j`` (source item ``sources[j]``, image
        ``images[j]``), the ``rank``-th of the ``m`` synthetic items of its source (``ranks`` and
        ``siblings``: arrays in the order of ``sources``),
        shows neighbour ``(h(seed, source) + rank + epoch * step) % k``, ``step = m`` if ``m < k`` else 1:
        the items of one source show different neighbours (evenly spread over the ``k`` when ``m >= k``),
        another ``m`` of them each epoch, all ``k`` within ``ceil(k / m)`` epochs, the same ones for the
        same seed and epoch."""
        src = np.fromiter(sources.values(), dtype=np.int64, count=len(sources))
        rank, m = np.asarray(ranks, dtype=np.uint64), np.asarray(siblings, dtype=np.uint64)
        with np.errstate(over="ignore"):
            step = np.where(m < np.uint64(self.k), m, np.uint64(1))
            rs = ((mix(seed, src) % np.uint64(self.k) + rank + np.uint64(epoch) * step) % np.uint64(self.k)).tolist()
        out = {}
        for j, r in zip(sources, rs):
            row = self.row_of_index(sources[j])
            self.check_source(row, images[j])
            out[j] = self.neighbour(row, r)
        return out

    def check_covers(self, owner_fp: dict, indices: torch.Tensor, owner_labels=None) -> None:
        """Refuse to serve a dataset whose generator or knobs differ, with sources the bank lacks, or
        (when the rows depend on labels) whose labels (``owner_labels``, per item) differ from the bank's."""
        mine = self.fingerprint()
        keys = [k for k in ("generator_sha256", "alpha", "steps", "convert_channels", "label_filter", "dtype")
                if mine.get(k) != owner_fp.get(k)]
        if keys:
            raise DKGMError(f"the neighbour bank was made with another {', '.join(keys)} than the dataset's; "
                            "pass the same generator and knobs to both")
        lacking = indices[~torch.isin(indices, self.indices)]
        if not len(lacking) and self.uses_labels and owner_labels is not None:
            mine_labels = dict(zip(self.indices.tolist(), self.row_labels()))
            wrong = [i for i in indices.tolist() if mine_labels[i] != owner_labels[i]]
            if wrong:
                raise DKGMError(f"the neighbour bank was made with other labels than the dataset's for {len(wrong)} "
                                f"source item(s) (the first: item {wrong[0]}, {mine_labels[wrong[0]]!r} in the bank, "
                                f"{owner_labels[wrong[0]]!r} in the dataset); build it with the dataset's labels")
        if len(lacking):
            raise DKGMError(f"the neighbour bank holds no neighbours of {len(lacking)} source item(s) of the dataset "
                            f"(the first: item {int(lacking[0])}); build it over every item (indices=None)")

    def __getstate__(self):
        state = {**self.__dict__, "_by_digest": None, "_checked": None}
        state["_model"] = None            # made again from the generator if ever needed
        if self.built:
            state["ds"] = None            # lookups need no dataset; workers never generate
        return state


def _counts(label_filter):
    """A copy of a label filter's counters (None without one)."""
    if label_filter is None:
        return None
    return {"drawn": dict(label_filter.drawn), "rejected": dict(label_filter.rejected),
            "exhausted": dict(label_filter.exhausted)}


def bank_for(owner, bank):
    """The bank behind ``BalancedDKGMDataset(..., bank=)``: None; an int ``k``, for a bank of ``k``
    neighbours of each source item made with the dataset's generator, knobs, seed and label filter
    and kept in its ``cache`` file; or a :class:`NeighbourBank` covering every source item."""
    if bank is None:
        return None
    sources = torch.unique(owner._sources.long())
    labels = [owner.class_values[int(c)] for c in owner._codes[:owner.n_real]]   # the dataset's, as it generates
    if isinstance(bank, NeighbourBank):
        bank.check_covers(owner.fingerprint(), sources, labels)
        return bank
    if isinstance(bank, bool) or not isinstance(bank, int):
        raise DKGMError(f"bank must be None, an integer k >= 1 or a NeighbourBank, got {bank!r}")
    k = check_int("bank (neighbours per source image)", bank, 1, MAX_K)
    if not len(sources):
        return None                           # nothing to add: no synthetic item to draw
    return NeighbourBank(owner.ds, owner.generator, k, indices=sources, alpha=owner.alpha, steps=owner.steps,
                         seed=owner.seed, path=owner.cache if isinstance(owner.cache, Path) else None,
                         device=owner.device, convert_channels=owner.convert_channels,
                         label_filter=owner.label_filter, image_key=owner.image_key, label_key=owner.label_key,
                         dtype=getattr(owner, "dtype", None), compile=getattr(owner, "compile", False), labels=labels)
