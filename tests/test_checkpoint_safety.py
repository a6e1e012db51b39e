"""Issue 12 for checkpoints: local files named like shipped generators, resource bounds,
errors that name the file, and temp files left by killed writers."""
import errno
import json
import os
import resource
import struct
import subprocess
import sys
import time
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import SafetensorError
from safetensors.torch import save_file

import dkgm_aug
from dkgm_aug import CheckpointError, DKGMError
from dkgm_aug import checkpoint
from dkgm_aug.checkpoint import MAX_MODEL_BYTES, METADATA_KEY, PRETRAINED_DIR, atomic_write, read_metadata
from conftest import micro_model

SHIPPED = "digits-tiny"
MICRO_BYTES = 340_648           # parameters and buffers of micro_model(image_size=8)
# A DKGM with the 'cifar' layout but 512 base channels: about 4 GiB, over MAX_MODEL_BYTES.
HUGE_UNET = dict(channels=3, base_channels=512, channel_mult=[1, 2, 2, 2], num_res_blocks=2, attn_levels=[1],
                 mid_attention=True, dropout=0.1)


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "g.safetensors"
    micro_model(image_size=8).save(path)
    return path


def _huge_meta():
    """Checkpoint metadata for a DKGM of two HUGE_UNET stages."""
    config = micro_model(image_size=8).config()
    config["stage1"], config["stage2"] = dict(HUGE_UNET, time_input=False), dict(HUGE_UNET, time_input=True)
    return dict(format_version=1, kind="dkgm", library_version="0", value_range=[-1.0, 1.0], config=config)


# -- a local file named like a shipped generator ------------------------------------------------

def test_local_file_named_like_a_shipped_generator_wins_with_a_warning(micro_ckpt, tmp_path, monkeypatch):
    assert SHIPPED in dkgm_aug.list_pretrained()
    (tmp_path / SHIPPED).write_bytes(micro_ckpt.read_bytes())
    monkeypatch.chdir(tmp_path)
    local = micro_model(image_size=8).config()
    for spec in (SHIPPED, checkpoint.Path(SHIPPED)):
        with pytest.warns(UserWarning, match=r"loading the file .*PRETRAINED_DIR / 'digits-tiny.safetensors'"):
            assert dkgm_aug.load(spec).config() == local
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dkgm_aug.load(f"./{SHIPPED}").config() == local
        assert dkgm_aug.load(PRETRAINED_DIR / f"{SHIPPED}.safetensors").config() != local


def test_shipped_name_without_a_local_file_loads_the_shipped_one_silently(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / SHIPPED).mkdir()          # a folder of that name is not a checkpoint: not taken
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = dkgm_aug.load(SHIPPED)
    assert model.config() == dkgm_aug.load(PRETRAINED_DIR / f"{SHIPPED}.safetensors").config()


# -- resource bounds ----------------------------------------------------------------------------

def test_the_limit_covers_every_preset():
    with torch.device("meta"):
        model = dkgm_aug.DKGM.from_preset("cifar", image_size=32, channels=3)
    size = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert 200 * 2 ** 20 < size < MAX_MODEL_BYTES / 4


def test_tiny_file_with_a_huge_config_fails_fast(tmp_path):
    path = tmp_path / "huge.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={METADATA_KEY: json.dumps(_huge_meta())})
    assert path.stat().st_size < 10_000
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"model of 4\.\d\d GiB, over the 2\.00 GiB limit.*max_bytes=None"):
        dkgm_aug.load(path)
    assert time.perf_counter() - start < 10


def _sparse_checkpoint(path, meta):
    """A checkpoint whose header is right for ``meta``'s model, with holes for data: tiny on disk."""
    with torch.device("meta"):
        state = dkgm_aug.DKGM.from_config(meta["config"]).state_dict()
    header, offset = {"__metadata__": {METADATA_KEY: json.dumps(meta)}}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        header[name] = dict(dtype="F32", shape=list(t.shape), data_offsets=[offset, offset + n])
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def test_sparse_file_with_a_huge_model_is_refused_before_allocating(tmp_path):
    path = tmp_path / "sparse.safetensors"
    size = _sparse_checkpoint(path, _huge_meta())
    assert size > MAX_MODEL_BYTES
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="over the 2.00 GiB limit"):
        dkgm_aug.load(path)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown_kib < 2 ** 20          # under 1 GiB more at the peak: the model was never built


def test_max_bytes_opts_in(micro_ckpt):
    with pytest.raises(CheckpointError, match="0.3 MiB, over the 0.1 MiB limit"):
        dkgm_aug.load(micro_ckpt, max_bytes=100_000)
    assert dkgm_aug.load(micro_ckpt, max_bytes=None).image_size == (8, 8)
    with pytest.raises(DKGMError, match="max_bytes"):
        dkgm_aug.load(micro_ckpt, max_bytes=-1)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2 * MICRO_BYTES))
def test_max_bytes_is_a_sharp_bound(micro_ckpt, max_bytes):
    if max_bytes < MICRO_BYTES:
        with pytest.raises(CheckpointError, match="limit"):
            dkgm_aug.load(micro_ckpt, max_bytes=max_bytes)
    else:
        dkgm_aug.load(micro_ckpt, max_bytes=max_bytes)


def test_tensor_data_is_checked_against_the_model_before_reading(micro_ckpt, tmp_path):
    from safetensors import safe_open
    with safe_open(str(micro_ckpt), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).double() for k in f.keys()}
    path = tmp_path / "f64.safetensors"
    save_file(tensors, path, metadata=meta)
    with pytest.raises(CheckpointError, match=f"holds {2 * MICRO_BYTES:,} bytes of tensor data.*has "
                                              f"{MICRO_BYTES:,}"):
        dkgm_aug.load(path)


def test_truncated_file_names_the_file(micro_ckpt, tmp_path):
    data = micro_ckpt.read_bytes()
    for cut in (4, 20, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=str(path)):
            dkgm_aug.load(path)


# -- errors name the file -----------------------------------------------------------------------

def test_directory_as_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        dkgm_aug.load(tmp_path)
    with pytest.raises(CheckpointError, match=f"could not read checkpoint {tmp_path}") as info:
        read_metadata(tmp_path)
    assert isinstance(info.value.__cause__, OSError)


def test_file_deleted_between_calls(micro_ckpt, tmp_path, monkeypatch):
    path = tmp_path / "gone.safetensors"
    path.write_bytes(micro_ckpt.read_bytes())

    def read_then_delete(p):
        meta = read_metadata(p)
        os.unlink(p)
        return meta

    monkeypatch.setattr(checkpoint, "read_metadata", read_then_delete)
    with pytest.raises(CheckpointError, match=f"could not read checkpoint {path}") as info:
        dkgm_aug.load(path)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(CheckpointError, match=str(path)):
        read_metadata(path)


def test_name_too_long_for_the_file_system():
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        dkgm_aug.load("x" * 5000)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(micro_ckpt, tmp_path):
    path = tmp_path / "locked.safetensors"
    path.write_bytes(micro_ckpt.read_bytes())
    path.chmod(0)
    with pytest.raises(CheckpointError, match=f"could not read checkpoint {path}.*ermission"):
        dkgm_aug.load(path)


def _no_space(tmp):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)


def test_disk_full_names_the_destination(tmp_path):
    dest = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match=f"could not write {dest}: .*No space left on device") as info:
        atomic_write(dest, _no_space)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_safetensors_write_error_names_the_destination(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(checkpoint, "save_file", fail)
    dest = tmp_path / "gen.safetensors"
    with pytest.raises(CheckpointError, match=f"could not write {dest}: .*No space left") as info:
        micro_model(image_size=8).save(dest)
    assert isinstance(info.value.__cause__, SafetensorError)
    assert list(tmp_path.iterdir()) == []


# -- temp files of killed writers ---------------------------------------------------------------

def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_name_carries_host_and_pid(tmp_path):
    names = []
    atomic_write(tmp_path / "f.bin", lambda tmp: names.append(os.path.basename(tmp)) or open(tmp, "wb").close())
    assert names[0].startswith(f".f.bin.{checkpoint._HOST}.{os.getpid()}.") and names[0].endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


@pytest.mark.skipif(os.name == "nt", reason="no pid probing on Windows")
def test_stale_temp_files_are_removed_live_ones_kept(tmp_path):
    host, dead = checkpoint._HOST, _dead_pid()
    old = time.time() - 2 * checkpoint.OLD_TEMP_AGE_S
    files = {
        f".gen.safetensors.{host}.{dead}.abcd1234.tmp": "gone",           # its writer died
        f".gen.safetensors.{host}.{os.getpid()}.abcd1234.tmp": "kept",    # a live writer
        f".gen.safetensors.other-host.{dead}.abcd1234.tmp": "kept",       # cannot ask another host
        ".gen.safetensors.old_1234.tmp": "gone",                          # older version, over an hour
        ".gen.safetensors.new_1234.tmp": "kept",                          # older version, recent
        f".gen.safetensors.x.{host}.{dead}.abcd1234.tmp": "kept",         # another file's temp
        f".other.{host}.{dead}.abcd1234.tmp": "kept",
    }
    for name in files:
        (tmp_path / name).write_bytes(b"partial")
    os.utime(tmp_path / ".gen.safetensors.old_1234.tmp", (old, old))
    atomic_write(tmp_path / "gen.safetensors", lambda tmp: open(tmp, "wb").close())
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {name for name, fate in files.items() if fate == "kept"} | {"gen.safetensors"}
