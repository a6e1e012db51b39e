"""Precomputed images on disk: shard files, and folders of them (docs/scale.md).

A shard is one safetensors file holding rows ``start .. stop - 1`` of a precomputed set:
``images`` (uint8: ``[n, C, H, W]`` synthetic items of a ``BalancedDKGMDataset``, or
``[n, k, C, H, W]`` rows of a ``NeighbourBank``) and ``sources`` (per row, the digest of the source
image it was made from, :func:`dkgm_aug.cache.digest`). Its metadata is one JSON value (the format
``shard`` of :data:`dkgm_aug.checkpoint.FORMATS`): the fingerprint of what made the rows, ``start``,
``stop`` and both tensors' checksums. :func:`~dkgm_aug.checkpoint.write_tensors` sorts the metadata
keys, so a shard's bytes depend on its content alone: a run split over processes writes the same
files as one process.

A folder (``dkgm-aug precompute``, or a bank ``path`` without ``.safetensors``) holds
``manifest.json`` (kind, fingerprint, row count, shard size) and ``shard-00000-of-00008.safetensors``
and so on. Each shard is written atomically (:func:`dkgm_aug.checkpoint.atomic_write`), so a killed
run leaves whole shards, and a rerun skips those that are finished. Reads memory-map the images
read-only: DataLoader workers share the page cache instead of holding copies.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ._validate import check_int
from .cache import DIGEST_BYTES, check_path
from .checkpoint import FORMATS, FormatError, _header, check_format, write_tensors
from .errors import CheckpointError, DKGMError
from .files import atomic_write

KEY = FORMATS["shard"].key
FORMAT = FORMATS["shard"].version
MANIFEST = "manifest.json"
_KINDS = {"bank": "a neighbour bank", "balanced": "the synthetic set of a BalancedDKGMDataset"}


def shard_ranges(n_rows: int, shard_size) -> list:
    """``[(start, stop), ...]`` of consecutive shards of ``shard_size`` rows (one empty shard for no rows)."""
    shard_size = check_int("shard_size", shard_size, 1)
    return [(s, min(s + shard_size, n_rows)) for s in range(0, n_rows, shard_size)] or [(0, 0)]


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.safetensors"


def _sha256(a) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()


def write_shard(path, images: torch.Tensor, sources: torch.Tensor, fingerprint: dict, start: int, stop: int,
                stats=None) -> None:
    """Write rows ``start .. stop - 1`` atomically (a reader sees the old file, or the whole new one).
    ``stats``: a JSON value about how the rows were made (a bank's label-filter counts), kept in the
    metadata and read back by :func:`shard_stats`."""
    images, sources = images.contiguous().cpu(), sources.contiguous().cpu()
    meta = dict(format=FORMAT, fingerprint=fingerprint, start=start, stop=stop,
                images_sha256=_sha256(images.numpy()), sources_sha256=_sha256(sources.numpy()))
    if stats is not None:
        meta["stats"] = stats
    text = json.dumps(meta, sort_keys=True)
    check_path(Path(path))
    write_tensors(path, {"images": images, "sources": sources}, {KEY: text}, "shard")


def _layout(path: Path) -> tuple:
    """``(metadata, {name: (shape, byte offset)})`` of a shard, from its header alone."""
    header_len, size = _header(path)
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"could not read shard {path}: {exc}") from None
    except ValueError:
        raise CheckpointError(f"shard {path} is corrupt (its header is not JSON)") from None
    meta = header.pop("__metadata__", None) or {}
    try:
        check_format(path, meta, "shard")
    except FormatError as exc:   # someone else's file: a DKGMError, so that it is never overwritten
        raise DKGMError(f"{exc}; pass another path") from None
    tensors, end = {}, 0
    for name in ("images", "sources"):
        info = header.get(name) or {}
        lo, hi = info.get("data_offsets", (0, -1))
        if info.get("dtype") != "U8" or hi - lo != int(np.prod(info.get("shape", [-1]))):
            raise CheckpointError(f"shard {path} is corrupt (tensor {name!r} is missing or not uint8)")
        tensors[name], end = (tuple(info["shape"]), 8 + header_len + lo), max(end, hi)
    if 8 + header_len + end != size:
        raise CheckpointError(f"shard {path} is truncated or corrupt ({size} bytes, its header says "
                              f"{8 + header_len + end})")
    return json.loads(meta[KEY]), tensors


def _array(path: Path, shape: tuple, offset: int) -> np.ndarray:
    if 0 in shape:
        return np.zeros(shape, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)


def shard_stats(path):
    """The ``stats`` a shard was written with (None if none), from its header alone."""
    return _layout(Path(path))[0].get("stats")


def open_shard(path, fingerprint: dict, start: int, stop: int, verify: bool = True) -> tuple:
    """``(images, sources)`` of a shard made for ``fingerprint`` holding rows ``start .. stop - 1``:
    images memory-mapped read-only (numpy), sources a ``[n, 16]`` uint8 tensor. A file made for
    something else raises DKGMError; a damaged one CheckpointError (with ``verify``, the checksums
    are checked too: one read of the file)."""
    path = Path(path)
    meta, tensors = _layout(path)
    if meta.get("format") != FORMAT:
        raise DKGMError(f"{path} is in shard format {meta.get('format')}, this dkgm_aug reads {FORMAT}; "
                        "delete it and precompute again")
    differ(path, meta.get("fingerprint"), fingerprint)
    if (meta.get("start"), meta.get("stop")) != (start, stop):
        raise DKGMError(f"{path} holds rows {meta.get('start')} .. {meta.get('stop')}, expected {start} .. {stop} "
                        "(written with another shard size); delete the folder or pass another one")
    images, sources = (_array(path, *tensors[name]) for name in ("images", "sources"))
    if len(images) != stop - start or sources.shape != (stop - start, DIGEST_BYTES):
        raise CheckpointError(f"shard {path} is corrupt (it holds {len(images)} rows, its header {stop - start})")
    if verify and (_sha256(images) != meta["images_sha256"] or _sha256(sources) != meta["sources_sha256"]):
        raise CheckpointError(f"shard {path} is corrupt (its images do not match their checksum)")
    return images, torch.from_numpy(np.array(sources))


def differ(path, saved, expected: dict, what: str = "it") -> None:
    """Refuse a file made for another fingerprint, naming the fields that differ."""
    if saved != expected:
        saved = saved if isinstance(saved, dict) else {}
        keys = sorted(k for k in expected.keys() | saved.keys() if saved.get(k) != expected.get(k))
        raise DKGMError(f"{path} was made with other settings (differs in {keys}); delete {what} or pass another path")


def finished(path, fingerprint: dict, start: int, stop: int) -> bool:
    """Whether ``path`` is a complete, intact shard of these rows (a damaged one is redone)."""
    if not Path(path).exists():
        return False
    try:
        open_shard(path, fingerprint, start, stop)
    except CheckpointError:
        return False
    return True


def manifest(kind: str, fingerprint: dict, n_rows: int, shard_size: int, info=None) -> dict:
    n = len(shard_ranges(n_rows, shard_size))
    return dict(format=FORMAT, kind=kind, fingerprint=fingerprint, n_rows=n_rows, shard_size=shard_size,
                n_shards=n, info=info or {})


def ensure_manifest(folder: Path, wanted: dict) -> None:
    """Write ``manifest.json`` into ``folder``, or check the one there: a folder of another run is refused."""
    path = folder / MANIFEST
    if folder.exists() and not folder.is_dir():
        raise DKGMError(f"{folder} is not a folder; pass a folder path for the shards")
    if path.exists():
        old = read_manifest(folder)
        differ(path, {k: old.get(k) for k in wanted if k != "info"}, {k: v for k, v in wanted.items() if k != "info"},
               "the folder")
        return
    text = json.dumps(wanted, sort_keys=True, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DKGMError(f"{folder} holds no {MANIFEST}: it is not a folder written by dkgm-aug precompute") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not read {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DKGMError(f"{path} is not a manifest of shard format {FORMAT}; delete the folder and precompute again")
    return meta


def write_shards(folder, kind: str, fingerprint: dict, n_rows: int, shard_size: int, make, rank: int = 0,
                 world_size: int = 1, progress: bool = True, info=None, after_shard=None, source_digest=None) -> dict:
    """Write the shards of rank ``rank`` (shards ``rank``, ``rank + world_size``, ...) into ``folder``,
    skipping those already finished. ``make(start, stop)`` returns ``(images, sources)`` of those rows,
    or ``(images, sources, stats)`` (see :func:`write_shard`), and must depend on nothing else, so that
    any split over ranks gives the same files. ``source_digest(row)``: the digest of the row's source
    image in the data at hand; a finished shard with a row made from another image is refused (the
    fingerprint holds no pixels: a rerun on changed data skipped every shard as done), at the cost of
    reading every source of the finished shards once.
    ``after_shard(n)`` (tests) is called after this process has written its ``n``-th shard."""
    folder = Path(folder)
    ranges = shard_ranges(n_rows, shard_size)
    ensure_manifest(folder, manifest(kind, fingerprint, n_rows, shard_size, info))
    mine = list(range(rank, len(ranges), world_size))
    todo = [i for i in mine if not finished(folder / shard_name(i, len(ranges)), fingerprint, *ranges[i])]
    done = sorted(set(mine) - set(todo)) if source_digest is not None else []
    with tqdm(total=sum(ranges[i][1] - ranges[i][0] for i in done), desc="checking finished shards",
              disable=not (progress and done)) as bar:
        for i in done:      # every row: one changed image among many was skipped as done, the folder 'complete'
            start = ranges[i][0]
            _, sources = open_shard(folder / shard_name(i, len(ranges)), fingerprint, *ranges[i], verify=False)
            for r in range(len(sources)):
                if bytes(sources[r].numpy()) != source_digest(start + r):
                    raise DKGMError(f"{folder} was made from other images (row {start + r}'s source differs from the "
                                    "data's): the data changed since; delete the folder or pass another one")
            bar.update(len(sources))
    total = sum(ranges[i][1] - ranges[i][0] for i in todo)
    with tqdm(total=total, desc=f"rank {rank}: shards" if world_size > 1 else "shards", disable=not progress) as bar:
        for n, i in enumerate(todo, 1):
            start, stop = ranges[i]
            images, sources, *stats = make(start, stop)
            write_shard(folder / shard_name(i, len(ranges)), images, sources, fingerprint, start, stop, *stats)
            bar.update(stop - start)
            if after_shard is not None:
                after_shard(n)
    return dict(shards=len(ranges), mine=len(mine), written=len(todo), skipped=len(mine) - len(todo))


def _check_folder(folder: Path, kind: str, fingerprint: dict) -> dict:
    meta = read_manifest(folder)
    if meta.get("kind") != kind:
        raise DKGMError(f"{folder} holds {_KINDS.get(meta.get('kind'), repr(meta.get('kind')))}, not "
                        f"{_KINDS[kind]}; pass another folder")
    differ(folder / MANIFEST, meta.get("fingerprint"), fingerprint, "the folder")
    return meta


def _files(folder: Path, meta: dict) -> tuple:
    ranges = shard_ranges(meta["n_rows"], meta["shard_size"])
    return ranges, [folder / shard_name(i, len(ranges)) for i in range(len(ranges))]


def folder_complete(folder, kind: str, fingerprint: dict) -> bool:
    """Whether a shard folder made for ``fingerprint`` has every shard file (DKGMError if made for another)."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        return False
    return all(f.exists() for f in _files(folder, _check_folder(folder, kind, fingerprint))[1])


class Store:
    """Rows of precomputed images in one shard file or a folder of shards, memory-mapped on first
    use in each process (a pickled Store carries paths, not images)."""

    def __init__(self, path, kind: str, fingerprint: dict, n_rows: int):
        self.path, self.fingerprint, self.n_rows = Path(path), fingerprint, n_rows
        if self.path.is_dir():
            self.ranges, self.files = _files(self.path, _check_folder(self.path, kind, fingerprint))
            missing = [i for i, f in enumerate(self.files) if not f.exists()]
            if missing:
                raise DKGMError(f"{self.path} lacks {len(missing)} of its {len(self.files)} shards (the first: "
                                f"{self.files[missing[0]].name}); rerun the same precompute to finish it")
        else:
            self.ranges, self.files = [(0, n_rows)], [self.path]
        self.starts = np.array([a for a, _ in self.ranges], dtype=np.int64)
        self._images, self.sources = self._open(verify=True)

    def _open(self, verify: bool):
        parts = [open_shard(f, self.fingerprint, a, b, verify) for f, (a, b) in zip(self.files, self.ranges)]
        return [p[0] for p in parts], torch.cat([p[1] for p in parts])

    def __len__(self) -> int:
        return self.n_rows

    def _arrays(self) -> list:
        if self._images is None:          # first use in this process (a DataLoader worker)
            self._images, _ = self._open(verify=False)
        return self._images

    def row(self, r: int) -> np.ndarray:
        """Row ``r`` as a read-only view into its shard."""
        s = int(np.searchsorted(self.starts, r, side="right")) - 1
        return self._arrays()[s][r - self.starts[s]]

    def stats(self) -> list:
        """Each shard's ``stats`` (None where it was written without), read from the headers."""
        return [shard_stats(f) for f in self.files]

    def tensor(self) -> torch.Tensor:
        """Every row, copied into one tensor."""
        return torch.from_numpy(np.concatenate([np.asarray(a) for a in self._arrays()]))

    def __getstate__(self):
        return {**self.__dict__, "_images": None}


def read_folder(folder, kind: str, fingerprint: dict, n_rows: int) -> tuple:
    """``(images, sources)`` of a whole folder, in memory: what ``BalancedDKGMDataset.load_cache`` takes."""
    store = Store(folder, kind, fingerprint, n_rows)
    return store.tensor(), store.sources
