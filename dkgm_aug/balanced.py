"""Class-balanced oversampling with DKGM neighbours (DESIGN.md section 4).

:class:`BalancedDKGMDataset` appends synthetic items to a map-style ``(image, label)``
dataset until its class counts follow imbalanced-learn's ``sampling_strategy``. Each
synthetic item is a debiased KDE neighbour of a real item of its class. Which real item,
and which noise seed, is fixed in ``__init__`` (the index plan); the images themselves
are made on first access, or in batches by ``precompute()``, and can be kept in a
safetensors cache file.
"""
import hashlib
import json
import numbers
import operator
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .augment import generate, load_generator
from .checkpoint import atomic_write, read_metadata, resolve
from .dkgm import check_knobs
from .errors import CheckpointError, DataError, DKGMError
from .images import to_unit_float

STRATEGIES = ("auto", "minority", "not minority", "not majority", "all")
_CACHE_KEY = "dkgm_aug_balanced"


def label_key(y):
    """A label as a hashable Python value: 0-d tensors and numpy scalars become int/float/bool."""
    if isinstance(y, torch.Tensor):
        if y.numel() != 1:
            raise DataError(f"a label must be a single value, got a tensor of shape {tuple(y.shape)}")
        return y.item()
    return y.item() if isinstance(y, (np.generic, np.ndarray)) and np.size(y) == 1 else y


def read_labels(ds, progress: bool = True):
    """``(sorted distinct labels, int32 class code per item)``. Reads ``ds.targets`` or
    ``ds.labels`` when present, so that no image is loaded; else one pass over ``ds[i][1]``."""
    n = len(ds)
    if n == 0:
        raise DataError("the dataset is empty: BalancedDKGMDataset needs at least one labelled item")
    raw = next((a for a in (getattr(ds, "targets", None), getattr(ds, "labels", None))
                if isinstance(a, (list, tuple, np.ndarray, torch.Tensor))), None)
    if raw is None:
        raw = [label_key(ds[i][1]) for i in tqdm(range(n), desc="reading labels", disable=not progress)]
    if isinstance(raw, torch.Tensor):
        raw = raw.cpu().numpy()
    if isinstance(raw, (list, tuple)):
        raw = [label_key(v) for v in raw]
        kinds = {str if isinstance(v, str) else numbers.Number if isinstance(v, numbers.Number) else type(v)
                 for v in raw}
        if len(kinds) != 1 or not kinds <= {str, numbers.Number}:
            raise DataError(f"labels must be all numbers or all strings, found {sorted(k.__name__ for k in kinds)}")
    arr = np.asarray(raw)
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(f"the dataset has {n} items but its targets have shape {arr.shape}; "
                        "give one label per item (class indices, not one-hot)")
    classes, codes = np.unique(arr, return_inverse=True)
    return classes.tolist(), torch.from_numpy(codes.astype(np.int32).reshape(-1))


def oversampling_targets(strategy, counts: dict, y) -> dict:
    """How many items to add to each class: imbalanced-learn's over-sampling semantics.
    ``counts`` maps each label to its count in sorted label order, as imblearn's
    ``np.unique`` does, so ties for majority/minority go to the smallest label."""
    if len(counts) < 2:
        raise DataError(f"the dataset has only {len(counts)} class; over-sampling needs at least 2")
    n_max, majority, minority = max(counts.values()), max(counts, key=counts.get), min(counts, key=counts.get)
    choices = (f"one of {STRATEGIES}, a float in (0, 1] (two classes only), a dict "
               "{label: wanted count} or a callable y -> dict")
    if isinstance(strategy, str):
        chosen = {"auto": lambda c: c != majority, "not majority": lambda c: c != majority,
                  "minority": lambda c: c == minority, "not minority": lambda c: c != minority,
                  "all": lambda c: True}.get(strategy)
        if chosen is None:
            raise DKGMError(f"unknown sampling_strategy {strategy!r}: use {choices}")
        return {c: n_max - n for c, n in counts.items() if chosen(c)}
    if isinstance(strategy, numbers.Real) and not isinstance(strategy, bool):
        if not 0 < strategy <= 1:
            raise DKGMError(f"a float sampling_strategy must be in (0, 1], got {strategy}")
        if len(counts) != 2:
            raise DKGMError(f"a float sampling_strategy needs exactly 2 classes, the dataset has "
                            f"{len(counts)}; use a dict {{label: wanted count}} instead")
        wanted = {c: int(n_max * strategy - n) for c, n in counts.items() if c != majority}
        if any(v <= 0 for v in wanted.values()):
            raise DKGMError(f"sampling_strategy={strategy} asks for no new minority items "
                            f"(class counts {counts}); increase the ratio")
        return wanted
    if callable(strategy):
        strategy = strategy(y)
    if not isinstance(strategy, dict):
        raise DKGMError(f"sampling_strategy must be {choices}, got {type(strategy).__name__}")
    strategy = {label_key(k): v for k, v in strategy.items()}
    unknown = [k for k in strategy if k not in counts]
    if unknown:
        raise DKGMError(f"sampling_strategy names classes {unknown} that are not in the dataset "
                        f"(its classes: {list(counts)})")
    for c, v in strategy.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < counts[c]:
            raise DKGMError(f"sampling_strategy asks for {v!r} items of class {c!r}, which already has "
                            f"{counts[c]}; over-sampling only adds items: ask for an integer >= {counts[c]}")
    return {c: int(v) - counts[c] for c, v in strategy.items()}


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _like(q: torch.Tensor, like):
    """The uint8 CHW image ``q`` in the type, dtype and layout of ``like`` (the source image)."""
    if isinstance(like, torch.Tensor):
        return q.clone() if like.dtype == torch.uint8 else q.to(like.dtype) / 255
    hwc = q.permute(1, 2, 0).numpy()
    if isinstance(like, np.ndarray):
        arr = hwc[..., 0] if like.ndim == 2 else hwc
        return arr.copy() if like.dtype == np.uint8 else (arr / np.float32(255)).astype(like.dtype)
    from PIL import Image
    out = Image.fromarray(np.ascontiguousarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc))
    return out if out.mode == like.mode else out.convert(like.mode)


def _readable(image):
    # The model sees gray or RGB; other PIL modes (palette, alpha, 1-bit, 16-bit) go through those.
    if isinstance(image, (torch.Tensor, np.ndarray)) or getattr(image, "mode", "L") in ("L", "RGB"):
        return image
    return image.convert("L" if image.mode in ("1", "LA", "La", "I", "I;16", "F") else "RGB")


class BalancedDKGMDataset(torch.utils.data.Dataset):
    """``ds`` plus synthetic DKGM neighbours of its real items, so that class counts follow
    imbalanced-learn's ``sampling_strategy`` (``"auto"``: every class as large as the largest).

    Items ``0 .. n_real - 1`` are ``ds``'s own, unchanged; the synthetic items follow, grouped
    by class. Synthetic item ``j`` starts from a real item of its class chosen by a seeded
    permutation and is generated with noise seed ``seed * 1_000_003 + j``, so two datasets
    with the same arguments hold the same images. Images come back in the type of their
    source (PIL, numpy HWC, uint8 or float tensor), quantized to 256 grey levels, then
    ``transform`` is applied, to real and synthetic items alike. ``cache`` is ``"memory"``,
    ``None``, or a ``.safetensors`` path that ``precompute()`` fills and later runs reload.

    >>> ds = BalancedDKGMDataset(train_set, generator="fashion-mnist-tiny", sampling_strategy="auto")  # doctest: +SKIP
    >>> ds.class_counts_before, ds.class_counts                                                       # doctest: +SKIP
    >>> loader = DataLoader(ds.precompute(), batch_size=128, shuffle=True, num_workers=4)             # doctest: +SKIP
    """

    def __init__(self, ds, generator, sampling_strategy="auto", alpha=None, steps=None, transform=None,
                 seed: int = 0, cache="memory", device=None, convert_channels: bool = False,
                 progress: bool = True):
        self.alpha, self.steps = check_knobs(alpha=alpha), check_knobs(steps=steps)   # it checks one per call
        if isinstance(generator, (str, os.PathLike)):
            read_metadata(resolve(generator))   # a wrong name or path fails here, not in a worker
            self.generator, self._model = os.fspath(generator), None   # loaded on first use
        elif isinstance(generator, torch.nn.Module):
            self.generator = self._model = load_generator(generator, device)
        else:
            raise DKGMError(f"generator must be a shipped name, a checkpoint path or a model, "
                            f"got {type(generator).__name__}")
        if not (cache is None or cache == "memory" or str(cache).endswith(".safetensors")):
            raise DKGMError(f"cache must be 'memory', None or a path ending in .safetensors, got {cache!r}")
        self.ds, self.transform, self.seed = ds, transform, operator.index(seed)
        self.device, self.convert_channels = device, bool(convert_channels)
        self.cache = Path(cache) if cache not in (None, "memory") else cache
        self.sampling_strategy = sampling_strategy

        self.classes, real_codes = read_labels(ds, progress)
        counts = np.bincount(real_codes.numpy(), minlength=len(self.classes)).tolist()
        self.class_counts_before = dict(zip(self.classes, counts))
        y = np.asarray(self.classes)[real_codes.numpy()] if callable(sampling_strategy) else None
        n_new = oversampling_targets(sampling_strategy, self.class_counts_before, y)
        self.class_counts = {c: n + n_new.get(c, 0) for c, n in self.class_counts_before.items()}

        # The plan: per class, cycle through a seeded permutation of its real items.
        g = torch.Generator().manual_seed(self.seed)
        index_dtype = torch.int32 if len(real_codes) < 2 ** 31 else torch.int64
        codes, sources = [real_codes], [torch.zeros(0, dtype=index_dtype)]
        for k, c in enumerate(self.classes):
            n = n_new.get(c, 0)
            if n > 0:
                members = torch.nonzero(real_codes == k).flatten()
                perm = members[torch.randperm(len(members), generator=g)]
                sources.append(perm.repeat(-(-n // len(perm)))[:n].to(index_dtype))
                codes.append(torch.full((n,), k, dtype=torch.int32))
        self._codes = torch.cat(codes)
        self._sources = torch.cat(sources)
        self.n_real, self.n_synthetic = len(real_codes), len(self._sources)

        self._cache, self._cache_file_ok = {}, False   # synthetic index -> uint8 CHW image
        if isinstance(self.cache, Path) and self.cache.exists():
            try:
                self.load_cache(self.cache)
            except CheckpointError as exc:
                warnings.warn(f"{exc}; ignoring it, precompute() will rebuild it", stacklevel=2)

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

    @property
    def targets(self) -> list:
        """The label of every item, synthetic ones included (built on each access)."""
        return [self.classes[k] for k in self._codes.tolist()]

    # -- items ------------------------------------------------------------------------------------
    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices) -> list:
        """Items ``indices`` as a list, generating the synthetic ones not cached yet in one batch.
        ``DataLoader`` calls this with a whole batch of indices, so on-demand generation is
        batched too; each image still gets its own noise seed, so it does not depend on which
        other items share its batch."""
        idx = [self._index(i) for i in indices]
        sources = {i - self.n_real: self.ds[int(self._sources[i - self.n_real])][:2] for i in idx if i >= self.n_real}
        todo = [j for j in sources if j not in self._cache]
        made = dict(zip(todo, self._make(todo, [sources[j][0] for j in todo], self._generator()))) if todo else {}
        if self.cache is not None:
            self._cache.update(made)
        items = []
        for i in idx:
            if i < self.n_real:
                item = self.ds[i]
            else:
                image, label = sources[i - self.n_real]
                q = made.get(i - self.n_real)
                item = (_like(self._cache[i - self.n_real] if q is None else q, image), label)
            items.append(item if self.transform is None else (self.transform(item[0]), *item[1:]))
        return items

    def _make(self, js: list, sources: list, model) -> list:
        """Synthetic images ``js`` (from source images ``sources``) as uint8 CHW tensors,
        generated in one batch per image size."""
        images = [to_unit_float(_readable(image)) for image in sources]
        out = [None] * len(js)
        for shape in dict.fromkeys(tuple(x.shape) for x in images):
            ks = [k for k, x in enumerate(images) if tuple(x.shape) == shape]
            made = generate(model, torch.stack([images[k] for k in ks]), [self.noise_seed(js[k]) for k in ks],
                            self.alpha, self.steps, self.convert_channels, labels=self._labels([js[k] for k in ks]))
            for k, q in zip(ks, (made * 255).round().to(torch.uint8)):
                out[k] = q
        return out

    def _labels(self, js) -> list:
        """The class labels of synthetic items ``js``, for generators that condition on them."""
        return [self.classes[int(self._codes[self.n_real + j])] for j in js]

    def _generator(self, device=None):
        if self._model is None:
            self._model = load_generator(self.generator, self.device)
        return self._model if device is None else self._model.to(device)

    def precompute(self, batch_size: int = 256, device=None, progress: bool = True):
        """Generate every synthetic image not made yet, ``batch_size`` at a time on ``device``
        (default: the dataset's), with the same per-image seeds as on-demand access. Keeps
        them in memory (even with ``cache=None``) and writes the cache file if one was given."""
        todo = [j for j in range(self.n_synthetic) if j not in self._cache]
        model = self._generator(device)
        with tqdm(total=len(todo), desc="generating", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                js = todo[start:start + batch_size]
                sources = [self.ds[int(self._sources[j])][0] for j in js]
                self._cache.update(zip(js, self._make(js, sources, model)))
                bar.update(len(js))
        if isinstance(self.cache, Path) and (todo or not self._cache_file_ok):
            self.save_cache(self.cache)
        return self

    # -- cache file -------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What the synthetic images depend on; a cache file is used only if this matches."""
        if isinstance(self.generator, str):
            digest = hashlib.sha256()
            with open(resolve(self.generator), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            name, generator_hash = self.generator, digest.hexdigest()
        else:
            digest = hashlib.sha256(json.dumps(getattr(self._model, "config", dict)(), sort_keys=True).encode())
            for k, v in self._model.state_dict().items():
                digest.update(k.encode() + v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            name, generator_hash = type(self._model).__name__, digest.hexdigest()
        plan = torch.cat([self._sources.long(), self._codes[self.n_real:].long()]).numpy()
        fp = dict(format=1, seed=self.seed, n_real=self.n_real, n_synthetic=self.n_synthetic,
                  counts_before=[[repr(c), n] for c, n in self.class_counts_before.items()],
                  counts_after=[[repr(c), n] for c, n in self.class_counts.items()],
                  plan_sha256=_sha256(plan.tobytes()), generator=name, generator_sha256=generator_hash,
                  alpha=self.alpha, steps=self.steps, convert_channels=bool(self.convert_channels))
        return json.loads(json.dumps(fp))

    def save_cache(self, path) -> None:
        """Write every synthetic image (uint8) to one safetensors file, atomically."""
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
        meta = {_CACHE_KEY: json.dumps(self.fingerprint()), "images_sha256": _sha256(images.numpy().data)}
        atomic_write(path, lambda tmp: save_file({"images": images.contiguous()}, tmp, metadata=meta))
        self._cache_file_ok = self._cache_file_ok or Path(path) == self.cache

    def load_cache(self, path):
        """Read images written by ``save_cache``: a file for another plan raises DKGMError,
        a truncated or corrupt one CheckpointError."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if _CACHE_KEY not in meta:   # someone else's file: never overwrite it
                    raise DKGMError(f"{path} is not a BalancedDKGMDataset cache; pass another cache path")
                images = f.get_tensor("images")
            saved = json.loads(meta[_CACHE_KEY])
            ok = images.dtype == torch.uint8 and _sha256(images.contiguous().numpy().data) == meta["images_sha256"]
        except DKGMError:
            raise
        except Exception as exc:   # safetensors raises its own error types on damaged files
            raise CheckpointError(f"cache file {path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
        if not ok:
            raise CheckpointError(f"cache file {path} is corrupt (its images do not match their checksum)")
        expected = self.fingerprint()
        if saved != expected:
            differ = sorted(k for k in expected.keys() | saved.keys() if saved.get(k) != expected.get(k))
            raise DKGMError(f"cache file {path} was made for another dataset plan (differs in {differ}); "
                            "delete it or pass a new cache path")
        if len(images) != self.n_synthetic:
            raise CheckpointError(f"cache file {path} holds {len(images)} images, its plan {self.n_synthetic}")
        self._cache.update(enumerate(images))
        self._cache_file_ok = self._cache_file_ok or Path(path) == self.cache
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        if isinstance(self.generator, str):
            state["_model"] = None   # DataLoader workers reload it from the file: keeps the pickle small
        return state
