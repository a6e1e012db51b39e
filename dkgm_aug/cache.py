"""The cache file of :class:`~dkgm_aug.balanced.BalancedDKGMDataset`: every synthetic image (uint8
CHW) in one safetensors file, with the fingerprint of what made them (plan, generator, knobs)
in its metadata and, per image, a digest of the source image it was generated from (the format
``balanced-cache`` of :data:`dkgm_aug.checkpoint.FORMATS`)."""
import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import FORMATS, FormatError, read_tensors, resolve, write_tensors
from .errors import CheckpointError, DKGMError
from .files import _cause
from .images import to_uint8

try:
    import fcntl
except ImportError:   # not POSIX (Windows): writes go unlocked
    fcntl = None

FORMAT = FORMATS["balanced-cache"].version
KEY = FORMATS["balanced-cache"].key
DIGEST_BYTES = 16
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def digest(x01: torch.Tensor) -> bytes:
    """A digest of an image in [0, 1] as the generator saw it: its shape and its 256-level pixels."""
    return batch_digests(x01[None])[0]


def batch_digests(x01: torch.Tensor) -> list:
    """:func:`digest` of each image of a ``[B, C, H, W]`` batch in [0, 1], with one conversion and one
    copy to the CPU for the whole batch (a GPU batch is not synchronised once per image)."""
    q = to_uint8(x01).cpu().contiguous().numpy()
    shape = repr(tuple(q.shape[1:])).encode()
    return [hashlib.blake2b(shape + row.tobytes(), digest_size=DIGEST_BYTES).digest() for row in q]


def digest_rows(digests: list) -> torch.Tensor:
    """Digests from :func:`digest` as a ``[n, DIGEST_BYTES]`` uint8 tensor."""
    return torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).view(-1, DIGEST_BYTES)


def generator_digest(generator) -> tuple:
    """``(name, sha256)`` of a generator: of its checkpoint file, or of a model's config and weights."""
    if isinstance(generator, str):
        h = hashlib.sha256()
        with open(resolve(generator), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return generator, h.hexdigest()
    h = hashlib.sha256(json.dumps(getattr(generator, "config", dict)(), sort_keys=True).encode())
    for k, v in generator.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return type(generator).__name__, h.hexdigest()


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().data).hexdigest()


def check_path(path: Path) -> None:
    """Refuse a cache path that exists but is not a regular file: opening a FIFO blocks forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError:   # missing, or under a non-folder: check_writable says which
        return
    kind = next((name for test, name in _KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a regular file")
    if kind is not None:
        raise DKGMError(f"cache={os.fspath(path)!r} is {kind}, not a regular file; pass a path to a .safetensors file")


def check_writable(path: Path) -> None:
    """Refuse a cache path whose folder cannot be written, before any image is generated."""
    folder = path.parent
    while not folder.exists():   # atomic_write makes the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise DKGMError(f"cannot write cache file {path}: {folder} is not a folder; pass another cache path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DKGMError(f"cannot write cache file {path}: the folder {folder} is not writable; "
                        "pass a cache path in a writable folder")


def read(path, expected: dict):
    """``(images, digests)`` of the cache file ``path`` made for fingerprint ``expected``. Raises
    DKGMError for a file that is not such a cache, CheckpointError for a damaged one."""
    check_path(Path(path))
    try:
        meta, tensors = read_tensors(path, "balanced-cache", names=("images", "sources"))
        saved = json.loads(meta[KEY])
        if saved.get("format") != FORMAT:
            raise DKGMError(f"cache file {path} is in cache format {saved.get('format')}, this dkgm_aug uses "
                            f"{FORMAT}; delete it or pass a new cache path")
        images, digests = tensors["images"], tensors["sources"]
        ok = (images.dtype == digests.dtype == torch.uint8 and _sha256(images) == meta["images_sha256"]
              and _sha256(digests) == meta["sources_sha256"])
    except FormatError as exc:   # someone else's file: a DKGMError, so that it is never overwritten
        raise DKGMError(f"{exc}; pass another cache path") from None
    except DKGMError:            # a damaged file (CheckpointError), or a cache of another format
        raise
    except Exception as exc:     # metadata that is not what write() writes
        raise CheckpointError(f"cache file {path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if not ok:
        raise CheckpointError(f"cache file {path} is corrupt (its images do not match their checksum)")
    if saved != expected:
        differ = sorted(k for k in expected.keys() | saved.keys() if saved.get(k) != expected.get(k))
        raise DKGMError(f"cache file {path} was made for another dataset plan (differs in {differ}); "
                        "delete it or pass a new cache path")
    if not len(images) == len(digests) == expected["n_synthetic"]:
        raise CheckpointError(f"cache file {path} holds {len(images)} images, its plan {expected['n_synthetic']}")
    return images, digests


def write(path, images: torch.Tensor, digests: torch.Tensor, fingerprint: dict) -> None:
    """Write a cache file atomically, under a lock, unless another writer left a different cache there."""
    path = Path(path)
    check_path(path)
    meta = {KEY: json.dumps(fingerprint), "images_sha256": _sha256(images), "sources_sha256": _sha256(digests)}
    tensors = {"images": images.contiguous(), "sources": digests.contiguous()}
    try:
        with _locked(path):
            _check_overwrite(path, meta)
            # serialize: this module's save_file, which tests replace (a full disk, the lock held)
            write_tensors(path, tensors, meta, "balanced-cache", serialize=save_file)
    except (OSError, CheckpointError) as exc:   # the lock file, or the write (e.g. "No space left on device")
        raise CheckpointError(f"could not write cache file {path}: {_cause(exc.__cause__ or exc)}") from None


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on the sibling file ``.<name>.lock``, so that check and write are one step
    for concurrent processes. The lock file stays: removing it would let two writers lock two files."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as f:   # closing it releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _check_overwrite(path: Path, meta: dict) -> None:
    """Refuse to replace a file that is not a cache, or a cache of another plan or other sources:
    another process (or dataset) wrote it since this one looked, and would silently lose it."""
    try:
        old, _ = read_tensors(path, "balanced-cache", names=())
        other = (json.loads(old[KEY]), old.get("sources_sha256"))
    except FormatError as exc:   # someone else's file
        raise DKGMError(f"{exc}; pass another cache path") from None
    except Exception:   # missing, or damaged: nothing to lose
        return
    if other != (json.loads(meta[KEY]), meta["sources_sha256"]):
        raise DKGMError(f"cache file {path} now holds the images of another dataset plan or other source images "
                        "(written by another process or dataset since this one checked it); give each dataset "
                        "its own cache path")
