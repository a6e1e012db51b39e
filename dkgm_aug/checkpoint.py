"""Checkpoints: one safetensors file per generator, config in its metadata (DESIGN.md section 2).

``save(model, path)`` writes every tensor of the model plus a JSON config under the
metadata key ``"dkgm_aug"``; ``load(path_or_name)`` rebuilds the model from that
file alone. Nothing is ever unpickled. The file is validated before the model is
built: size of the header, format version, model kind, config schema, and then
every tensor's name, shape and dtype against the model the config describes.
"""
import importlib
import json
import os
import re
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, DKGMError

FORMAT_VERSION = 1
METADATA_KEY = "dkgm_aug"
MAX_HEADER_BYTES = 16 * 2 ** 20
MAX_METADATA_CHARS = 2 ** 20
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# Modules whose ``GENERATORS`` tuple lists the model classes checkpoints may hold.
_KIND_MODULES = ("dkgm", "vae", "kss")


def model_kinds() -> dict:
    """Every model class that checkpoints may hold, by its ``kind``."""
    return {cls.kind: cls for name in _KIND_MODULES
            for cls in importlib.import_module(f".{name}", __package__).GENERATORS}


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    """A shipped generator's name, or a path to a checkpoint file."""
    text = os.fspath(path_or_name)
    if text in list_pretrained() and _NAME.match(text):
        return PRETRAINED_DIR / f"{text}.safetensors"
    path = Path(text)
    if not path.is_file():
        shipped = ", ".join(list_pretrained()) or "none installed"
        raise CheckpointError(f"no checkpoint file at {text!r} and no shipped generator of that name "
                              f"(shipped: {shipped})")
    return path


def read_metadata(path) -> dict:
    """Parse and check the JSON metadata of a checkpoint without reading its tensors."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path} is not a safetensors checkpoint (file too short)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint (bad header length); "
                              "re-download or re-train it")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:   # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint: {exc}") from None
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


def load(path_or_name, device=None):
    """Rebuild a generator from a checkpoint path or a shipped name; returns it in eval mode.

    >>> model = dkgm_aug.load("gen.safetensors")          # doctest: +SKIP
    """
    path = resolve(path_or_name)
    meta = read_metadata(path)
    cls = model_kinds()[meta["kind"]]
    try:
        with torch.device("meta"):   # build without allocating, to check names and shapes first
            skeleton = cls.from_config(meta["config"])
    except (DKGMError, TypeError, KeyError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
        raise CheckpointError(f"{path}: invalid model config: {exc}") from None
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        if names != set(expected):
            missing, extra = sorted(set(expected) - names)[:5], sorted(names - set(expected))[:5]
            raise CheckpointError(f"{path}: tensors do not match the config (missing {missing}, "
                                  f"unexpected {extra})")
        for name in names:
            sl = f.get_slice(name)
            shape = tuple(sl.get_shape())
            if shape != expected[name][0]:
                raise CheckpointError(f"{path}: tensor {name} has shape {shape}, config expects "
                                      f"{expected[name][0]}")
        try:
            state = {name: f.get_tensor(name) for name in names}
        except Exception as exc:
            raise CheckpointError(f"{path}: could not read tensors ({exc}); the file is truncated or "
                                  "corrupt") from None
    for name, tensor in state.items():
        if tensor.dtype != expected[name][1]:
            raise CheckpointError(f"{path}: tensor {name} has dtype {tensor.dtype}, expected "
                                  f"{expected[name][1]}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or inf values; the file is corrupt")
    model = cls.from_config(meta["config"])
    model.load_state_dict(state)
    return model.to(device).eval() if device is not None else model.eval()
