"""Checkpoints: one safetensors file per generator, config in its metadata (docs/design.md, section 3).

``save(model, path)`` writes every tensor of the model plus a JSON config under the
metadata key ``"dkgm_aug"``; ``load(path_or_name)`` rebuilds the model from that
file alone. Nothing is ever unpickled. The file is validated before the model is
built: size of the header, format version, model kind, config schema, and then
every tensor's name, shape and dtype against the model the config describes.

Names: ``load("digits-tiny")`` takes the shipped generator of that name unless a file
``./digits-tiny`` exists; then the local file is taken, with a ``UserWarning`` that says
so (pass ``dkgm_aug.checkpoint.PRETRAINED_DIR / "digits-tiny.safetensors"`` for the
shipped one, or ``"./digits-tiny"`` to take the local file without the warning).

Limits, checked before any tensor is read:

* the header is at most ``MAX_HEADER_BYTES`` (16 MiB) and its metadata at most
  ``MAX_METADATA_CHARS`` (1 Mi characters);
* the model the config describes holds at most ``max_bytes`` of parameters and buffers,
  by default ``MAX_MODEL_BYTES`` (2 GiB, eight times the largest preset: ``cifar`` at
  3 channels is 262 MiB); ``load(path, max_bytes=None)`` lifts the limit for a file you trust.
  The model is measured on the meta device, so a small (or sparse) file whose config
  asks for a huge network fails without allocating it;
* the file's tensor data must be exactly as many bytes as that model: a truncated file,
  or one with other dtypes, fails before anything is read.

Errors: every problem reading or writing a checkpoint, OS errors included (a missing
file, a directory, no permission, a full disk), raises :class:`~dkgm_aug.errors.CheckpointError`
naming the file; the OS or safetensors error is kept as ``__cause__``.

Writes go through :func:`atomic_write`: a temp file ``.{name}.{host}.{pid}.XXXXXXXX.tmp``
beside the destination, renamed onto it when complete. A writer killed mid-write
(SIGKILL, power loss) leaves its temp file behind; the next write to the same path
deletes it once its writer (same host) is no longer running, and deletes temp files
of older dkgm_aug versions (no pid in the name) after an hour.
"""
import json
import os
import re
import socket
import struct
import tempfile
import time
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._validate import check_int
from .errors import CheckpointError, DKGMError

FORMAT_VERSION = 1
METADATA_KEY = "dkgm_aug"
MAX_HEADER_BYTES = 16 * 2 ** 20
MAX_METADATA_CHARS = 2 ** 20
MAX_MODEL_BYTES = 2 * 2 ** 30
OLD_TEMP_AGE_S = 3600
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The writer's host in temp names, without dots so that the name splits unambiguously.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
# What follows ".{name}." in a temp name: "{host}.{pid}." (absent in older versions), then
# mkstemp's 8 random characters and ".tmp".
_TEMP_TAIL = re.compile(r"^(?:([A-Za-z0-9-]+)\.(\d{1,10})\.)?[a-z0-9_]{8}\.tmp$")


# The model classes checkpoints may hold, by kind. Filled by @register_kind as their modules
# import; model_kinds() imports those modules first, so this module need not import them
# (they import it: a top-level import here would be a cycle).
_KINDS = {}


def register_kind(cls):
    """Class decorator: let checkpoints hold ``cls``, under its ``kind`` attribute."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise DKGMError(f"{cls.__name__} needs a non-empty string `kind` to be registered")
    known = _KINDS.get(kind)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise DKGMError(f"model kind {kind!r} is taken by {known.__module__}.{known.__qualname__}")
    _KINDS[kind] = cls          # the same class again (a module reload) replaces the old one
    return cls


def model_kinds() -> dict:
    """Every model class that checkpoints may hold, by its ``kind``."""
    from . import dkgm, kss, vae  # noqa: F401  (importing them registers their classes)
    return dict(_KINDS)


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``: readers never see half a file.

    OS and safetensors errors (a full disk, a read-only folder) raise CheckpointError naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.",
                                   suffix=".tmp")
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"could not write {path}: {_cause(exc)}; {path.name} is unchanged "
                              "(the write is all or nothing)") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _remove_stale_temps(path: Path) -> None:
    """Delete the temp files that writers of ``path`` killed mid-write left beside it (best effort)."""
    prefix = f".{path.name}."
    try:
        with os.scandir(path.parent) as entries:
            tails = [e.name[len(prefix):] for e in entries if e.name.startswith(prefix)]
    except OSError:          # an unlistable folder: nothing to clean, and the write may still work
        return
    for tail in tails:
        file = path.parent / (prefix + tail)
        with suppress(OSError):    # removed by another writer meanwhile, or not ours to remove
            if _is_stale(file, tail):
                file.unlink()


def _is_stale(file: Path, tail: str) -> bool:
    match = _TEMP_TAIL.match(tail)
    if match is None:
        return False
    host, pid = match.groups()
    if host is None:        # written by an older version: no writer to ask, so go by age
        return time.time() - file.stat().st_mtime > OLD_TEMP_AGE_S
    return host == _HOST and not _running(int(pid))


def _running(pid: int) -> bool:
    if os.name == "nt":     # os.kill(pid, 0) would interrupt the process there, not probe it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):   # another user's process, or not a pid at all: leave it
        return True
    return True


def save(model, path, **info) -> None:
    """Write ``model`` to ``path`` (safetensors). ``info`` is merged into ``model.info`` first."""
    from . import __version__
    model.info.update(info)
    meta = dict(format_version=FORMAT_VERSION, kind=model.kind, library_version=__version__,
                value_range=[-1.0, 1.0], config=model.config())
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)}))


def list_pretrained() -> list:
    """Names of the generators shipped with the package (``dkgm_aug.load(name)`` takes them)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.safetensors"))


def resolve(path_or_name) -> Path:
    """A path to a checkpoint file, or a shipped generator's name; an existing file wins (with a warning)."""
    text = os.fspath(path_or_name)
    path = Path(text)
    shipped = bool(_NAME.match(text)) and text in list_pretrained()
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError as exc:     # e.g. a name too long for the file system
        raise CheckpointError(f"no checkpoint file at {text!r}: {_cause(exc)}") from exc
    if is_file and shipped:
        warnings.warn(f"{text!r} is both a file here and a shipped generator; loading the file "
                      f"{path.absolute()}. For the shipped one pass "
                      f"dkgm_aug.checkpoint.PRETRAINED_DIR / '{text}.safetensors'; pass './{text}' to take "
                      "the file without this warning", UserWarning, stacklevel=3)
    if is_file:
        return path
    if shipped:
        return PRETRAINED_DIR / f"{text}.safetensors"
    if is_dir:
        raise CheckpointError(f"{text!r} is a directory, not a checkpoint file; pass the .safetensors "
                              "file in it")
    names = ", ".join(list_pretrained()) or "none installed"
    raise CheckpointError(f"no checkpoint file at {text!r} and no shipped generator of that name "
                          f"(shipped: {names})")


@contextmanager
def _reading(path):
    """OS and safetensors errors while reading ``path`` become CheckpointErrors that name it."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"could not read checkpoint {path}: {_cause(exc)}") from exc


def _cause(exc) -> str:
    """An OS error's reason without its file name (a temp file's, or the one already named)."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _header(path: Path) -> tuple:
    """``(header length, file size)`` of a safetensors file, the length checked against both."""
    with _reading(path):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path} is not a safetensors checkpoint (file too short)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint (bad header length); "
                              "re-download or re-train it")
    return header_len, size


def read_metadata(path) -> dict:
    """Parse and check the JSON metadata of a checkpoint without reading its tensors."""
    path = Path(path)
    _header(path)
    with _reading(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
        except SafetensorError as exc:
            raise CheckpointError(f"{path} is not a valid safetensors checkpoint: {exc}") from exc
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a dkgm_aug checkpoint "
                              f"(no {METADATA_KEY!r} metadata)")
    if len(raw) > MAX_METADATA_CHARS:
        raise CheckpointError(f"{path}: checkpoint metadata is {len(raw):,} characters, over the "
                              f"{MAX_METADATA_CHARS:,} limit")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: checkpoint metadata has no config")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: checkpoint has no valid format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written in checkpoint format {version}; this dkgm_aug reads up "
                              f"to format {FORMAT_VERSION}: upgrade with `pip install -U dkgm-aug`")
    if not isinstance(meta.get("kind"), str) or meta["kind"] not in model_kinds():
        raise CheckpointError(f"{path}: unknown model kind {meta.get('kind')!r}; "
                              f"known: {sorted(model_kinds())}")
    return meta


def load(path_or_name, device=None, max_bytes=MAX_MODEL_BYTES):
    """Rebuild a generator from a checkpoint path or a shipped name; returns it in eval mode.

    ``max_bytes`` bounds the model's parameters and buffers (``None``: no bound; see the
    module docstring).

    >>> model = dkgm_aug.load("gen.safetensors")          # doctest: +SKIP
    """
    if max_bytes is not None:
        max_bytes = check_int("max_bytes", max_bytes, lo=0)
    path = resolve(path_or_name)
    meta = read_metadata(path)
    cls = model_kinds()[meta["kind"]]
    try:
        with torch.device("meta"):   # build without allocating, to check sizes, names and shapes first
            skeleton = cls.from_config(meta["config"])
    except (DKGMError, TypeError, KeyError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
        raise CheckpointError(f"{path}: invalid model config: {exc}") from None
    model_bytes = sum(v.numel() * v.element_size() for v in skeleton.state_dict().values())
    if max_bytes is not None and model_bytes > max_bytes:
        raise CheckpointError(f"{path}: its config describes a model of {_bytes(model_bytes)}, over the "
                              f"{_bytes(max_bytes)} limit (the largest preset, 'cifar', is 262 MiB); if you "
                              "trust this file, load it with dkgm_aug.load(path, max_bytes=None) (or a larger "
                              "max_bytes) and pass the model itself")
    state = _read_tensors(path, {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()},
                          model_bytes)
    model = cls.from_config(meta["config"])
    model.load_state_dict(state)
    return model.to(device).eval() if device is not None else model.eval()


def _bytes(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def _read_tensors(path: Path, expected: dict, model_bytes: int) -> dict:
    """The tensors of ``path``, checked against ``expected`` (name: (shape, dtype)) and, before
    anything is read, against the ``model_bytes`` the config describes."""
    with _reading(path), safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        if names != set(expected):
            missing, extra = sorted(set(expected) - names)[:5], sorted(names - set(expected))[:5]
            raise CheckpointError(f"{path}: tensors do not match the config (missing {missing}, "
                                  f"unexpected {extra})")
        for name in names:
            shape = tuple(f.get_slice(name).get_shape())
            if shape != expected[name][0]:
                raise CheckpointError(f"{path}: tensor {name} has shape {shape}, config expects "
                                      f"{expected[name][0]}")
        header_len, size = _header(path)
        if size - 8 - header_len != model_bytes:
            raise CheckpointError(f"{path} holds {size - 8 - header_len:,} bytes of tensor data, but the model "
                                  f"its config describes has {model_bytes:,}: its tensors have other dtypes, "
                                  "or the file is truncated; re-download or re-save it")
        state = {name: f.get_tensor(name) for name in names}
    for name, tensor in state.items():
        if tensor.dtype != expected[name][1]:
            raise CheckpointError(f"{path}: tensor {name} has dtype {tensor.dtype}, expected "
                                  f"{expected[name][1]}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or inf values; the file is corrupt")
    return state
