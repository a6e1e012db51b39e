"""Every file the library writes goes through one file layer (issue 13): each format round-trips
exactly through its own writer and reader, describe() names it (files from before the format tag
included), and a file of one format read as another is refused with an error naming both."""
import hashlib
import json

import pytest
import torch
from conftest import micro_model
from safetensors import safe_open
from safetensors.torch import save_file

import dkgm_aug
from dkgm_aug import cache, shards
from dkgm_aug.checkpoint import FORMAT_KEY, FORMATS, describe, read_metadata
from dkgm_aug.errors import CheckpointError, DKGMError
from dkgm_aug.features import FeatureNet, load_feature_net, save_feature_net
from dkgm_aug.train.state import read_state, write_state

N = 3
FINGERPRINT = dict(format=cache.FORMAT, seed=0, n_synthetic=N)
IMAGES = torch.arange(N * 16, dtype=torch.uint8).view(N, 1, 4, 4)
SOURCES = torch.arange(N * 16, dtype=torch.uint8).view(N, 16).flip(0).contiguous()


def _state_parts():
    torch.manual_seed(0)
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    rngs = [(torch.get_rng_state(), torch.get_rng_state())]
    return net, ema, opt, rngs


# Per format: write a tiny file to `path` and return what it holds; read it back the same way.
def write(fmt, path):
    if fmt == "generator":
        torch.manual_seed(0)
        model = micro_model(image_size=8)
        model.save(path)
        return {k: v.clone() for k, v in model.state_dict().items()}, model.config()
    if fmt == "trainer-state":
        net, ema, opt, rngs = _state_parts()
        write_state(path, "model.", net, ema, opt, rngs, dict(step=1, model_config={"kind": "linear"}, lr=1e-3))
        return {f"model.{k}": v.clone() for k, v in net.state_dict().items()}, {"step": 1, "lr": 1e-3}
    if fmt == "feature-net":
        torch.manual_seed(0)
        net = FeatureNet(channels=1, n_classes=3, width=2, feature_dim=4, info={"note": "tiny"})
        save_feature_net(net, path)
        return {k: v.clone() for k, v in net.state_dict().items()}, net.config()
    if fmt == "balanced-cache":
        cache.write(path, IMAGES, SOURCES, FINGERPRINT)
        return {"images": IMAGES, "sources": SOURCES}, FINGERPRINT
    shards.write_shard(path, IMAGES, SOURCES, FINGERPRINT, 0, N)
    return {"images": IMAGES, "sources": SOURCES}, {"fingerprint": FINGERPRINT, "start": 0, "stop": N}


def read(fmt, path):
    if fmt == "generator":
        return dkgm_aug.load(path).state_dict(), read_metadata(path)["config"]
    if fmt == "trainer-state":
        meta, tensors = read_state(path)
        return tensors, meta
    if fmt == "feature-net":
        net = load_feature_net(path)
        return net.state_dict(), net.config()
    if fmt == "balanced-cache":
        images, sources = cache.read(path, FINGERPRINT)
        return {"images": images, "sources": sources}, FINGERPRINT
    images, sources = shards.open_shard(path, FINGERPRINT, 0, N)
    return {"images": torch.from_numpy(images.copy()), "sources": sources}, shards._layout(path)[0]


def untagged(path, out):
    """``path`` rewritten as older versions wrote it: the same tensors and metadata, no format tag."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta[FORMAT_KEY]
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of each format, with what was written into it."""
    folder = tmp_path_factory.mktemp("formats")
    return {fmt: (folder / f"{fmt}.safetensors", *write(fmt, folder / f"{fmt}.safetensors")) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip_is_exact(fmt, files):
    path, tensors, meta = files[fmt]
    got, got_meta = read(fmt, path)
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert {k: got_meta[k] for k in meta} == json.loads(json.dumps(meta))   # tuples come back as lists


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_files_carry_their_format_tag_and_describe_names_them(fmt, files):
    path = files[fmt][0]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta[FORMAT_KEY] == f"{fmt}/{FORMATS[fmt].version}" and FORMATS[fmt].key in meta
    info = describe(path)
    assert (info["format"], info["version"], info["tagged"]) == (fmt, FORMATS[fmt].version, True)
    assert fmt in info["summary"] and FORMATS[fmt].title in info["summary"]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_files_from_before_the_tag_are_described_and_still_read(fmt, files, tmp_path):
    path, tensors, meta = files[fmt]
    old = untagged(path, tmp_path / "old.safetensors")
    info = describe(old)
    assert (info["format"], info["version"], info["tagged"]) == (fmt, FORMATS[fmt].version, False)
    assert "older layout" in info["summary"]
    got, got_meta = read(fmt, old)
    assert all(torch.equal(got[name], value) for name, value in tensors.items())
    assert {k: got_meta[k] for k in meta} == json.loads(json.dumps(meta))


def test_describe_a_file_the_library_did_not_write(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"), metadata={"other": "x"})
    info = describe(tmp_path / "plain.safetensors")
    assert info["format"] is None and info["tensors"] == 1 and "not a file this dkgm_aug writes" in info["summary"]


# Readers whose callers replace a damaged file (a CheckpointError) refuse another file with a plain
# DKGMError instead, so that it is never overwritten.
REPLACED_WHEN_DAMAGED = {"balanced-cache", "shard"}


@pytest.mark.parametrize("fmt, other", [(a, b) for a in FORMATS for b in FORMATS if a != b])
def test_a_file_of_another_format_is_refused_naming_both(fmt, other, files):
    with pytest.raises(DKGMError) as info:
        read(fmt, files[other][0])
    assert isinstance(info.value, CheckpointError) == (fmt not in REPLACED_WHEN_DAMAGED)
    message = str(info.value)
    assert f"({other})" in message and f"({fmt})" in message and "truncated" not in message, message


@pytest.mark.parametrize("fmt, other", [("generator", "trainer-state"), ("feature-net", "balanced-cache"),
                                        ("trainer-state", "generator"), ("shard", "balanced-cache")])
def test_an_old_file_of_another_format_is_refused_naming_both(fmt, other, files, tmp_path):
    old = untagged(files[other][0], tmp_path / "old.safetensors")
    with pytest.raises(DKGMError, match=rf"is a .*\({other}\), not a .*\({fmt}\)"):
        read(fmt, old)


def test_a_newer_version_is_refused(files, tmp_path):
    path = files["feature-net"][0]
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "new.safetensors"), metadata={**meta, FORMAT_KEY: "feature-net/99"})
    with pytest.raises(CheckpointError, match="feature-net format 99.*upgrade"):
        load_feature_net(tmp_path / "new.safetensors")


def test_the_same_content_gives_the_same_bytes(tmp_path):
    """Several metadata keys, which safetensors writes in a random order: the layer sorts them."""
    digests = set()
    for i in range(6):
        cache.write(tmp_path / f"c{i}.safetensors", IMAGES, SOURCES, FINGERPRINT)
        digests.add(hashlib.sha256((tmp_path / f"c{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_modules_take_their_keys_and_versions_from_the_registry():
    assert (cache.KEY, cache.FORMAT) == (FORMATS["balanced-cache"].key, FORMATS["balanced-cache"].version)
    assert (shards.KEY, shards.FORMAT) == (FORMATS["shard"].key, FORMATS["shard"].version)
    assert len({f.key for f in FORMATS.values()}) == len(FORMATS)   # one metadata key per format
