import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import dkgm_aug
from dkgm_aug import CheckpointError, Trainer
from dkgm_aug.checkpoint import FORMAT_VERSION, METADATA_KEY
from conftest import micro_model, shapes_batch


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = micro_model(alpha=0.3, steps=3, kernel="epanechnikov")
    trainer = Trainer(model, shapes_batch(32), out_dir=tmp_path / "run", batch_size=8, max_steps=2,
                      progress=False)
    trainer.fit(1)
    trainer.fit(2)
    path = tmp_path / "gen.safetensors"
    model.save(path, classes=["a", "b"])
    return model.cpu(), path     # the trainer may have moved it to a GPU


def test_train_save_load_sample_identical(saved):
    model, path = saved
    loaded = dkgm_aug.load(path)
    assert loaded.config() == model.config()
    assert (loaded.alpha, loaded.steps, loaded.kernel, loaded.info["classes"]) == (0.3, 3, "epanechnikov", ["a", "b"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = shapes_batch(4) * 2 - 1
    a = model.eval().sample(x, generator=torch.Generator().manual_seed(5))
    b = loaded.sample(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, x)


def test_save_is_safetensors_with_json_config(saved):
    _, path = saved
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        assert any(k.startswith("stage1.") for k in f.keys()) and any(k.startswith("stage2.") for k in f.keys())
    assert meta["format_version"] == FORMAT_VERSION and meta["kind"] == "dkgm"
    assert meta["config"]["stage2"]["time_input"] is True


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_half_storage_round_trip(saved, tmp_path, storage):
    """storage_dtype stores the float32 tensors at half the bytes; load gives float32 back, equal to
    the weights rounded once; the config, knobs and info are as saved."""
    model, path = saved
    half = tmp_path / "half.safetensors"
    model.save(half, storage_dtype=storage)
    loaded = dkgm_aug.load(half)
    dtype = getattr(torch, storage)
    assert loaded.config() == model.config() and loaded.info["classes"] == ["a", "b"]
    for k, v in model.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.dtype == v.dtype and torch.equal(got, v.to(dtype).to(v.dtype) if v.is_floating_point() else v), k
    assert half.stat().st_size < 0.6 * path.stat().st_size
    x = shapes_batch(4) * 2 - 1
    a = model.eval().sample(x, generator=torch.Generator().manual_seed(5))
    b = loaded.sample(x, generator=torch.Generator().manual_seed(5))
    assert (a - b).abs().max() < 0.1
    loaded.save(again := tmp_path / "again.safetensors")     # saved again at float32: exact from there on
    assert all(torch.equal(v, dkgm_aug.load(again).state_dict()[k]) for k, v in loaded.state_dict().items())


def test_bad_storage_dtype(saved, tmp_path):
    model, path = saved
    with pytest.raises(CheckpointError, match="storage_dtype must be"):
        model.save(tmp_path / "x.safetensors", storage_dtype="int8")
    p = _rewrite(path, tmp_path / "odd.safetensors", lambda m: m.update(storage_dtype="float8"))
    with pytest.raises(CheckpointError, match="unknown storage_dtype"):
        dkgm_aug.load(p)
    p = _rewrite(path, tmp_path / "lie.safetensors", lambda m: m.update(storage_dtype="float16"))
    with pytest.raises(CheckpointError, match="bytes of tensor data"):      # float32 tensors under a float16 label
        dkgm_aug.load(p)


def _rewrite(path, out, mutate_meta=None, mutate_tensors=None):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if mutate_meta:
        mutate_meta(meta)
    if mutate_tensors:
        mutate_tensors(tensors)
    save_file(tensors, out, metadata={METADATA_KEY: json.dumps(meta)})
    return out


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"not a safetensors file at all, just text")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        dkgm_aug.load(p)
    p.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        dkgm_aug.load(p)
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a dkgm_aug checkpoint"):
        dkgm_aug.load(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        dkgm_aug.load(tmp_path / "missing.safetensors")


def test_truncated(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 20):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            dkgm_aug.load(p)


def test_newer_format_says_upgrade(saved, tmp_path):
    _, path = saved
    p = _rewrite(path, tmp_path / "new.safetensors", lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match="upgrade"):
        dkgm_aug.load(p)


def test_config_and_tensor_mismatch(saved, tmp_path):
    _, path = saved
    p = _rewrite(path, tmp_path / "a.safetensors", lambda m: m["config"]["stage1"].update(base_channels=16))
    with pytest.raises(CheckpointError, match="shape"):
        dkgm_aug.load(p)
    p = _rewrite(path, tmp_path / "b.safetensors", mutate_tensors=lambda t: t.pop(next(iter(t))))
    with pytest.raises(CheckpointError, match="missing"):
        dkgm_aug.load(p)
    p = _rewrite(path, tmp_path / "c.safetensors", lambda m: m["config"].update(kernel="box"))
    with pytest.raises(CheckpointError, match="invalid model config"):
        dkgm_aug.load(p)
    p = _rewrite(path, tmp_path / "d.safetensors", lambda m: m.update(kind="gan"))
    with pytest.raises(CheckpointError, match="unknown model kind"):
        dkgm_aug.load(p)
    p = _rewrite(path, tmp_path / "e.safetensors",
                 mutate_tensors=lambda t: t.update({k: v.double() for k, v in t.items()}))
    with pytest.raises(CheckpointError, match="dtype"):
        dkgm_aug.load(p)


def test_huge_header_rejected_before_reading(tmp_path):
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")
    with pytest.raises(CheckpointError, match="header"):
        dkgm_aug.load(p)


def test_pretrained_names_cannot_escape(tmp_path):
    for name in ("../dkgm_aug/__init__", "/etc/passwd", "..", "nonexistent-model"):
        with pytest.raises(CheckpointError):
            dkgm_aug.load(name)
    assert isinstance(dkgm_aug.list_pretrained(), list)
