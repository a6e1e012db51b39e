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
* the file's tensor data must be exactly as many bytes as that model (stored at its
  ``storage_dtype`` when the file names one): a truncated file, or one with other dtypes,
  fails before anything is read.

Errors: every problem reading or writing a checkpoint, OS errors included (a missing
file, a directory, no permission, a full disk), raises :class:`~dkgm_aug.errors.CheckpointError`
naming the file; the OS or safetensors error is kept as ``__cause__``.

Writes go through :func:`dkgm_aug.files.atomic_write`: a reader sees the old file or the whole new one.

Every file the library writes, not only generators, goes through one file layer here:
:data:`FORMATS` names each format (metadata key, version), :func:`write_tensors` writes a file
atomically with the tag ``"dkgm_aug_format": "<name>/<version>"`` beside the format's own key,
:func:`read_tensors` refuses a file of another format with a :class:`FormatError` naming both, and
:func:`describe` says what any such file is, older files without the tag included.
"""
import json
import os
import re
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._validate import check_int
from .errors import CheckpointError, DKGMError
from .files import OLD_TEMP_AGE_S, _HOST, _cause, atomic_write  # noqa: F401  (here for older imports and tests)

FORMAT_VERSION = 1
METADATA_KEY = "dkgm_aug"
MAX_HEADER_BYTES = 16 * 2 ** 20
MAX_METADATA_CHARS = 2 ** 20
MAX_MODEL_BYTES = 2 * 2 ** 30
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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


# -- the file layer: every file the library writes ---------------------------------------------------

FORMAT_KEY = "dkgm_aug_format"


class FormatError(CheckpointError):
    """A file of another format than the one asked for (the message names both), or no dkgm_aug file."""


class Format(NamedTuple):
    key: str                  # the metadata key that holds the format's JSON
    version: int              # written as FORMAT_KEY = "<name>/<version>"
    title: str                # what messages call such a file
    writer: str               # what writes it
    version_field: str = ""   # where files from before FORMAT_KEY keep their version in the JSON (else 1)


# Every file the library writes, by format name (docs/design.md, section 3).
FORMATS = {
    "generator": Format(METADATA_KEY, FORMAT_VERSION, "dkgm_aug checkpoint", "dkgm_aug.checkpoint.save",
                        "format_version"),
    "trainer-state": Format("state", 1, "training state", "dkgm_aug.train.state.write_state"),
    "feature-net": Format("dkgm_aug_featurenet", 1, "FeatureNet file", "dkgm_aug.features.save_feature_net"),
    "balanced-cache": Format("dkgm_aug_balanced", 2, "BalancedDKGMDataset cache", "dkgm_aug.cache.write", "format"),
    "shard": Format("dkgm_aug_shard", 1, "dkgm_aug shard or bank file", "dkgm_aug.shards.write_shard", "format"),
}


def write_tensors(path, tensors: dict, meta: dict, fmt: str, serialize=None) -> None:
    """Write ``tensors`` and the metadata ``meta`` (``{key: string}``) to ``path`` atomically, as a file
    of format ``fmt``: ``meta`` gains ``FORMAT_KEY``, and its keys are sorted, so that the file's bytes
    depend on its content alone. ``serialize`` (tests: a full disk) replaces safetensors' ``save_file``."""
    meta = {**meta, FORMAT_KEY: f"{fmt}/{FORMATS[fmt].version}"}

    def write(tmp):
        (serialize or save_file)(tensors, tmp, metadata=meta)
        _sort_metadata(tmp)
    atomic_write(path, write)


def _sort_metadata(file) -> None:
    """Rewrite a safetensors header in place with its metadata keys sorted (safetensors writes them in a
    random order). The same JSON reordered has the same length, so no tensor moves."""
    with open(file, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        if len(text) <= n:
            f.seek(8)
            f.write(text.ljust(n))


def format_of(meta: dict) -> tuple:
    """``(name, version)`` of a file's format from its metadata: its ``FORMAT_KEY``, or for a file from
    before it, the format whose key it holds (version None); ``(None, None)`` for other files."""
    name, _, version = meta.get(FORMAT_KEY, "").partition("/")
    if name:
        return name, int(version) if version.isdigit() else None
    return next(((name, None) for name, f in FORMATS.items() if f.key in meta), (None, None))


def check_format(path, meta: dict, fmt: str) -> None:
    """Raise FormatError unless the metadata ``meta`` of ``path`` is of format ``fmt`` at a version this
    dkgm_aug reads. A file without ``FORMAT_KEY`` that holds the format's key has its older layout."""
    name, version = format_of(meta)
    want = FORMATS[fmt]
    if name not in (None, fmt):
        other = f"{FORMATS[name].title} ({name})" if name in FORMATS else f"file of an unknown format {name!r}"
        raise FormatError(f"{path} is a {other}, not a {want.title} ({fmt})")
    if want.key not in meta:
        raise FormatError(f"{path} is a safetensors file but not a {want.title} (no {want.key!r} metadata)")
    if version is not None and version > want.version:
        raise FormatError(f"{path} was written in {fmt} format {version}; this dkgm_aug reads up to format "
                          f"{want.version}: upgrade with `pip install -U dkgm-aug`")


def read_tensors(path, fmt: str, names=None) -> tuple:
    """``(metadata, tensors)`` of a file of format ``fmt`` (:func:`check_format`): the metadata as written
    (``{key: string}``) and the tensors ``names`` (default: all; ``()``: none, for the metadata alone).
    Every problem, OS errors included, raises CheckpointError naming the file."""
    path = Path(path)
    _header(path)
    with _reading(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                check_format(path, meta, fmt)
                tensors = {name: f.get_tensor(name) for name in (f.keys() if names is None else names)}
        except SafetensorError as exc:
            raise CheckpointError(f"{path} is not a valid safetensors checkpoint (truncated or corrupt): "
                                  f"{exc}") from exc
    return meta, tensors


def describe(path) -> dict:
    """What a file the library wrote is, files from before ``FORMAT_KEY`` included: ``format`` (None:
    not a dkgm_aug file), ``version``, ``tagged`` (it holds ``FORMAT_KEY``), ``tensors`` (how many),
    ``meta`` (its format's JSON) and a one-line ``summary``."""
    path = Path(path)
    _header(path)
    with _reading(path), safe_open(str(path), framework="pt") as f:
        raw, n = f.metadata() or {}, len(list(f.keys()))
    name, version = format_of(raw)
    out = dict(format=name, version=version, tagged=FORMAT_KEY in raw, tensors=n, meta=None)
    if name not in FORMATS or FORMATS[name].key not in raw:
        return dict(out, summary=f"{path.name}: {n} tensors, not a file this dkgm_aug writes")
    fmt = FORMATS[name]
    try:
        out["meta"] = json.loads(raw[fmt.key])
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: its {fmt.key!r} metadata is not valid JSON") from None
    if version is None:
        version = out["meta"].get(fmt.version_field, 1) if isinstance(out["meta"], dict) else 1
    layout = "" if out["tagged"] else ", an older layout without a format tag"
    return dict(out, version=version, summary=f"{path.name}: {fmt.title} ({name}/{version}{layout}), "
                                               f"written by {fmt.writer}; {n} tensors")


# Smaller files: float32 tensors stored as one of these, read back as float32 (``save(storage_dtype=)``).
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def save(model, path, storage_dtype=None, **info) -> None:
    """Write ``model`` to ``path`` (safetensors). ``info`` is merged into ``model.info`` first.
    ``storage_dtype="float16"`` (or ``"bfloat16"``) stores the float32 tensors at half the size;
    ``load`` gives them back as float32 (the weights rounded once: outputs change by the rounding)."""
    from . import __version__
    if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
        raise CheckpointError(f"storage_dtype must be None or one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
    model.info.update(info)
    meta = dict(format_version=FORMAT_VERSION, kind=model.kind, library_version=__version__,
                value_range=[-1.0, 1.0], config=model.config())
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if storage_dtype is not None:
        meta["storage_dtype"] = storage_dtype
        tensors = {k: v.to(STORAGE_DTYPES[storage_dtype]) if v.dtype == torch.float32 else v for k, v in tensors.items()}
    write_tensors(path, tensors, {METADATA_KEY: json.dumps(meta)}, "generator")


def read_metadata(path) -> dict:
    """Parse and check the JSON metadata of a checkpoint without reading its tensors."""
    path = Path(path)
    raw = read_tensors(path, "generator", names=())[0][METADATA_KEY]
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
    if meta.get("storage_dtype") is not None and meta["storage_dtype"] not in STORAGE_DTYPES:
        raise CheckpointError(f"{path}: unknown storage_dtype {meta['storage_dtype']!r}; known: {sorted(STORAGE_DTYPES)}")
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
    stored = STORAGE_DTYPES.get(meta.get("storage_dtype"))
    expected = {k: (tuple(v.shape), stored if stored is not None and v.dtype == torch.float32 else v.dtype)
                for k, v in skeleton.state_dict().items()}
    file_bytes = sum(v.numel() * expected[k][1].itemsize for k, v in skeleton.state_dict().items())
    state = _read_model_tensors(path, expected, file_bytes)
    if stored is not None:     # back to the model's own float32
        state = {k: v.to(torch.float32) if v.dtype == stored else v for k, v in state.items()}
    with torch.random.fork_rng(devices=[]):   # its random init is overwritten: it must not move the caller's stream
        model = cls.from_config(meta["config"])
    model.load_state_dict(state)
    return model.to(device).eval() if device is not None else model.eval()


def _bytes(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def _read_model_tensors(path: Path, expected: dict, model_bytes: int) -> dict:
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
