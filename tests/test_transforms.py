import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from torchvision import transforms, tv_tensors
from torchvision.transforms import v2

import dkgm_aug.albumentations as dalb
from dkgm_aug import CheckpointError, DataError, DKGMError
from dkgm_aug.transforms import DKGMAugment
from conftest import micro_model


def make_ckpt(path, channels=1):
    torch.manual_seed(0)
    m = micro_model(channels=channels, image_size=8)
    for net in (m.stage1, m.stage2):
        torch.nn.init.normal_(net.conv_out.weight, std=0.5)
    m.save(path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("ckpt") / "gray.safetensors")


@pytest.fixture(scope="module")
def rgb_ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("ckpt") / "rgb.safetensors", channels=3)


def pil_gray(seed=0, size=(8, 8)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size[::-1], dtype=np.uint8))


INPUTS = {
    "pil": lambda: pil_gray(),
    "uint8_chw": lambda: torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8),
    "uint8_bchw": lambda: torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8),
    "float_bchw": lambda: torch.rand(3, 1, 9, 7),
    "tv_image": lambda: tv_tensors.Image(torch.rand(1, 8, 8)),
}


def same_kind(a, b):
    if isinstance(a, Image.Image):
        return isinstance(b, Image.Image) and a.mode == b.mode and a.size == b.size
    return type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape


# -- shared checks every input kind goes through ------------------------------------------------
@pytest.mark.parametrize("kind", INPUTS)
def test_smoke_kind_kept_and_not_mutated(ckpt, kind):
    torch.manual_seed(0)
    x = INPUTS[kind]()
    before = np.array(x).copy() if isinstance(x, Image.Image) else x.clone()
    out = transforms.Compose([DKGMAugment(ckpt, seed=1)])(x)
    assert same_kind(x, out)
    after = np.array(x) if isinstance(x, Image.Image) else x
    assert (after == before).all()
    assert not np.array_equal(np.array(out), np.array(x)) if isinstance(x, Image.Image) else not torch.equal(out, x)


@pytest.mark.parametrize("kind", INPUTS)
def test_p0_is_identity_and_seed_replays(ckpt, kind):
    x = INPUTS[kind]()
    out = DKGMAugment(ckpt, p=0.0, seed=3)(x)
    assert out is x
    a, b = DKGMAugment(ckpt, seed=5)(x), DKGMAugment(ckpt, seed=5)(x)
    c = DKGMAugment(ckpt, seed=6)(x)
    arr = lambda z: np.array(z) if isinstance(z, Image.Image) else z.numpy()
    assert np.array_equal(arr(a), arr(b)) and not np.array_equal(arr(a), arr(c))


def test_params_replay_and_per_sample_p(ckpt):
    t = DKGMAugment(ckpt, p=0.5, seed=0)
    x = torch.rand(64, 1, 8, 8)
    params = t.make_params([x])
    out = t.transform(x, params)
    assert torch.equal(out, t.transform(x, params))
    changed = (out != x).flatten(1).any(1)
    assert torch.equal(changed, params["apply"])
    assert 16 < int(changed.sum()) < 48


def test_v2_compose_with_labels(ckpt):
    pipeline = v2.Compose([DKGMAugment(ckpt, seed=0), v2.ToDtype(torch.float32, scale=True)])
    img, label = pipeline(tv_tensors.Image(torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)), 3)
    assert isinstance(img, tv_tensors.Image) and img.dtype == torch.float32 and label == 3


def test_rgb_and_channel_mismatch(ckpt, rgb_ckpt):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert DKGMAugment(rgb_ckpt, seed=0)(rgb).mode == "RGB"
    with pytest.raises(DataError, match="convert_channels=True"):
        DKGMAugment(ckpt)(rgb)
    out = DKGMAugment(ckpt, convert_channels=True, seed=0)(rgb)
    assert out.mode == "RGB" and out.size == (8, 8)
    g = DKGMAugment(rgb_ckpt, convert_channels=True, seed=0)(torch.rand(2, 1, 8, 8))
    assert g.shape == (2, 1, 8, 8)


def test_loaded_model_object(ckpt):
    import dkgm_aug
    model = dkgm_aug.load(ckpt)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(DKGMAugment(model, seed=0)(x), DKGMAugment(ckpt, seed=0)(x))


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2 / 255), (torch.bfloat16, 12 / 255)])
def test_half_precision_model_follows_its_dtype(dtype, tol):
    import dkgm_aug                               # a trained generator: measured 0.54 and 4.8 / 255
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = DKGMAugment("digits-tiny", seed=0)(x)
    model = dkgm_aug.load("digits-tiny").to(dtype)   # the library's way to generate in fp16 on a GPU
    out = DKGMAugment(model, seed=0)(x)
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert 0 < (out - ref).abs().max() < tol      # rounded differently, not a different image
    assert all(p.dtype == dtype for p in model.parameters())


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(p=1.5), DKGMError, "p "), (dict(p=-0.1), DKGMError, "p "), (dict(alpha=-1), DKGMError, "alpha"),
    (dict(steps=-2), DKGMError, "steps"), (dict(seed="x"), DKGMError, "seed")])
def test_bad_arguments(ckpt, kwargs, err, match):
    with pytest.raises(err, match=match):
        DKGMAugment(ckpt, **kwargs)


def test_bad_inputs(ckpt, tmp_path):
    t = DKGMAugment(ckpt, seed=0)
    with pytest.raises(CheckpointError):
        DKGMAugment(tmp_path / "missing.safetensors")
    for bad, match in [(torch.full((1, 8, 8), float("nan")), "NaN"), (torch.zeros(1, 8, 8, dtype=torch.int16), "uint8"),
                       (torch.zeros(8, 8), "CHW"), (Image.new("RGBA", (8, 8)), "mode"),
                       (torch.zeros(0, 1, 8, 8), "empty")]:
        with pytest.raises(DataError, match=match):
            t(bad)


# -- property tests ----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), h=st.integers(1, 12), w=st.integers(1, 12), uint8=st.booleans(),
       p=st.floats(0, 1), seed=st.integers(0, 2 ** 31), batched=st.booleans())
def test_property_shape_dtype_range_no_mutation(ckpt, b, h, w, uint8, p, seed, batched):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 1, h, w) if batched else (1, h, w)
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if uint8 else torch.rand(shape, generator=g)
    x0 = x.clone()
    t = DKGMAugment(ckpt, p=p, seed=seed)
    out = t(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(x, x0)
    if not uint8:
        assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, DKGMAugment(ckpt, p=p, seed=seed)(x))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(2, 10), w=st.integers(2, 10), gray2d=st.booleans(), uint8=st.booleans(), seed=st.integers(0, 1000))
def test_property_albumentations_twin(ckpt, h, w, gray2d, uint8, seed):
    import albumentations as A
    rng = np.random.default_rng(seed)
    shape = (h, w) if gray2d else (h, w, 1)
    img = rng.integers(0, 256, shape, dtype=np.uint8) if uint8 else rng.random(shape, dtype=np.float32)
    img0 = img.copy()
    out = A.Compose([dalb.DKGMAugment(ckpt, p=1.0)], seed=seed)(image=img)["image"]
    again = A.Compose([dalb.DKGMAugment(ckpt, p=1.0)], seed=seed)(image=img)["image"]
    assert out.shape == img.shape and out.dtype == img.dtype and np.array_equal(img, img0)
    assert np.array_equal(out, again)
    assert out.min() >= 0 and (out.max() <= 1 if not uint8 else True)


def test_albumentations_p0_and_errors(ckpt):
    import albumentations as A
    img = np.zeros((8, 8), np.uint8)
    assert np.array_equal(A.Compose([dalb.DKGMAugment(ckpt, p=0.0)])(image=img)["image"], img)
    with pytest.raises(DataError, match="float32"):
        dalb.DKGMAugment(ckpt).apply(np.zeros((8, 8), np.float64), noise_seed=0)
    with pytest.raises(DKGMError, match="p "):
        dalb.DKGMAugment(ckpt, p=2)


# -- DataLoader workers ------------------------------------------------------------------------
class SameImage(torch.utils.data.Dataset):
    def __init__(self, tf):
        self.tf = tf

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.tf(torch.full((1, 8, 8), 0.5))


@pytest.mark.slow
@pytest.mark.parametrize("ctx, seed", [("fork", None), ("fork", 0), ("spawn", 0)])
def test_workers_draw_different_noise(ckpt, ctx, seed):
    t = DKGMAugment(ckpt, seed=seed)
    assert len(pickle.dumps(t)) < 20_000               # weights are not pickled: loaded per worker
    loader = torch.utils.data.DataLoader(SameImage(t), batch_size=1, num_workers=2, multiprocessing_context=ctx)
    out = [b[0] for b in loader]
    # items 0 and 1 are the first call in worker 0 and worker 1
    assert not torch.equal(out[0], out[1])
    assert not torch.equal(out[0], out[2])


class SameArray(torch.utils.data.Dataset):
    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.from_numpy(self.pipeline(image=np.full((8, 8), 128, np.uint8))["image"])


@pytest.mark.slow
def test_albumentations_twin_draws_different_noise_per_worker_and_epoch(ckpt):
    """Every worker holds a copy of albumentations' generator: the twin mixes in the worker's seed,
    so workers and epochs differ, and a run repeats under torch.manual_seed (it gave the same noise
    in every worker and every epoch)."""
    import albumentations as A
    loader = torch.utils.data.DataLoader(SameArray(A.Compose([dalb.DKGMAugment(ckpt, p=1.0)], seed=0)),
                                         batch_size=1, num_workers=2, multiprocessing_context="fork")
    torch.manual_seed(5)
    first, second = [b[0] for b in loader], [b[0] for b in loader]
    assert not torch.equal(first[0], first[1])                       # items 0 and 1: worker 0 and worker 1
    assert not any(torch.equal(a, b) for a, b in zip(first, second))  # epoch 2 is not epoch 1 again
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(first, [b[0] for b in loader]))


class Fired(torch.utils.data.Dataset):
    """Whether the pipeline changed item i's image (p fired), for 16 items."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __len__(self):
        return 16

    def __getitem__(self, i):
        img = np.full((8, 8), 128, np.uint8)
        return int(not np.array_equal(self.pipeline(image=img)["image"], img))


@pytest.mark.slow
def test_albumentations_twin_fires_p_on_other_draws_per_worker_and_epoch(ckpt):
    """Only the noise seed mixed in the worker's seed: whether p fired came from albumentations'
    py_random, of which every worker holds the same copy, so every worker augmented the same draws
    in every epoch (with a fixed order, the same items every epoch and the rest never)."""
    import albumentations as A
    loader = torch.utils.data.DataLoader(Fired(A.Compose([dalb.DKGMAugment(ckpt, p=0.5)], seed=0)),
                                         batch_size=8, num_workers=2, multiprocessing_context="fork")
    torch.manual_seed(5)
    epochs = [torch.cat(list(loader)).tolist() for _ in range(3)]
    assert any(e[:8] != e[8:] for e in epochs)                       # worker 0's batch is not worker 1's
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]          # nor one epoch the next
    torch.manual_seed(5)
    assert torch.cat(list(loader)).tolist() == epochs[0]             # and a run repeats


def test_images_p_leaves_alone_come_back_bit_for_bit_in_a_float64_batch():
    """The whole batch went through float32: with one image of 8 augmented, the other 7 came back
    rounded (up to 3e-8 off); near-range values clamped only when some image was augmented."""
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[3, 0, 0, 0] = 1 + 1e-4                                        # within the tolerance, left alone
    params = dict(apply=torch.tensor([True] + [False] * 7), seeds=list(range(8)), labels=None)
    out = DKGMAugment("digits-tiny", seed=0).transform(x, params)
    assert out.dtype == torch.float64 and torch.equal(out[1:], x[1:]) and not torch.equal(out[0], x[0])
    assert float(out[0].min()) >= 0 and float(out[0].max()) <= 1
