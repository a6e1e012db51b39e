"""Rows of the bad-input table (tests/bad_inputs.py) for checkpoint files."""
import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from dkgm_aug import CheckpointError, list_pretrained, load
from dkgm_aug.checkpoint import METADATA_KEY, atomic_write, read_metadata


def rows(ckpt, model, tmp):
    return [
        ("checkpoint: local file named like a shipped generator", lambda: _local_named_like_shipped(ckpt, tmp),
         "ok: the local file is taken, with a warning"),
        ("checkpoint: tiny file whose config asks for a huge model", lambda: load(_huge_config(ckpt, tmp)),
         (CheckpointError, "max_bytes=None")),
        ("checkpoint: truncated file", lambda: load(_truncated(ckpt, tmp)),
         (CheckpointError, "is not a valid safetensors checkpoint")),
        ("checkpoint: a directory as the checkpoint path", lambda: load(tmp), (CheckpointError, "is a directory")),
        ("checkpoint: disk full while writing", lambda: atomic_write(Path(tmp) / "full.safetensors", _no_space),
         (CheckpointError, "No space left on device")),
    ]


def _local_named_like_shipped(ckpt, tmp):
    """Load ``./<shipped name>`` from a folder holding a file of that name; return what was taken and the warning."""
    name = list_pretrained()[0]
    shutil.copy(ckpt, Path(tmp) / name)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load(name)
    finally:
        os.chdir(cwd)
        os.unlink(Path(tmp) / name)
    return f"image_size {model.image_size}, the local file's; UserWarning: {caught[0].message}"


def _huge_config(ckpt, tmp):
    """A 1 KB file whose config asks for two 'cifar'-shaped U-Nets of 512 base channels (4 GiB)."""
    meta = read_metadata(ckpt)
    for stage in ("stage1", "stage2"):
        meta["config"][stage].update(channels=3, base_channels=512, channel_mult=[1, 2, 2, 2], num_res_blocks=2)
    path = Path(tmp) / "huge.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={METADATA_KEY: json.dumps(meta)})
    return path


def _truncated(ckpt, tmp):
    path = Path(tmp) / "truncated.safetensors"
    data = Path(ckpt).read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def _no_space(tmp):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
