"""Issue 12 for the transforms: inputs that used to give silent wrong results now either work
(masks and boxes pass through) or raise an error that says what to do."""
import pickle
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import dkgm_aug.albumentations as dalb
import dkgm_aug.transforms as tvt
from dkgm_aug import DataError, DKGMError
from dkgm_aug.augment import MAX_PIXELS, WARN_PIXELS
from dkgm_aug.images import RANGE_TOL, to_unit_float
from dkgm_aug.transforms import DKGMAugment
from conftest import micro_model

TWINS = [DKGMAugment, dalb.DKGMAugment]
FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "g.safetensors"
    micro_model(image_size=8).save(path)
    return str(path)


def album(ckpt, img, p=1.0, seed=0, **kw):
    import albumentations as A
    return A.Compose([dalb.DKGMAugment(ckpt, p=p, **kw)], seed=seed)(image=img)["image"]


# -- 1. only images are augmented --------------------------------------------------------------
def test_mask_passes_through_and_image_changes(ckpt):
    img = tv_tensors.Image(torch.rand(1, 8, 8))
    mask = tv_tensors.Mask((torch.rand(1, 8, 8) > 0.5).long())
    out, out_mask = v2.Compose([DKGMAugment(ckpt, seed=0)])(img, mask)
    assert out_mask is mask
    assert isinstance(out, tv_tensors.Image) and not torch.equal(out, img)


def test_detection_sample_keeps_boxes_keypoints_and_labels(ckpt):
    sample = {"image": tv_tensors.Image(torch.rand(1, 8, 8)),
              "boxes": tv_tensors.BoundingBoxes([[0, 0, 4, 4]], format="XYXY", canvas_size=(8, 8)),
              "points": tv_tensors.KeyPoints([[1, 2]], canvas_size=(8, 8)),
              "mask": tv_tensors.Mask(torch.ones(1, 8, 8, dtype=torch.uint8)), "label": torch.tensor([3])}
    out = DKGMAugment(ckpt, seed=0)(sample)
    assert all(out[k] is sample[k] for k in ("boxes", "points", "mask", "label"))
    assert not torch.equal(out["image"], sample["image"])


def test_plain_tensor_is_an_image_only_without_image_or_pil(ckpt):
    t = DKGMAugment(ckpt, seed=0)
    x, extra = torch.rand(1, 8, 8), torch.rand(1, 8, 8)
    out, out_extra = t(x, extra)                  # v2's rule: the first plain tensor is the image
    assert not torch.equal(out, x) and out_extra is extra
    pil = Image.new("L", (8, 8), 128)
    out_pil, out_x = t(pil, x)
    assert out_x is x and isinstance(out_pil, Image.Image)


def test_video_is_refused(ckpt):
    with pytest.raises(DataError, match="Video"):
        DKGMAugment(ckpt, seed=0)(tv_tensors.Video(torch.rand(2, 1, 8, 8)))


# -- 2. float range ----------------------------------------------------------------------------
@pytest.mark.parametrize("x, hint", [
    (torch.rand(1, 8, 8) * 255, "divide by 255"),
    ((torch.rand(1, 8, 8) - 0.1307) / 0.3081, "before Normalize"),
    (torch.rand(1, 8, 8) * 2 - 1, "before Normalize"),
    (torch.rand(1, 8, 8) * 1.2 - 0.1, "bicubic")])
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_out_of_range_floats_are_refused_with_a_hint(ckpt, x, hint, p):
    with pytest.raises(DataError, match=hint):
        DKGMAugment(ckpt, p=p, seed=0)(x)
    with pytest.raises(DataError, match=hint):
        album(ckpt, x.permute(1, 2, 0).numpy(), p=p)
    with pytest.raises(DataError, match=hint):
        to_unit_float(x)                           # the balanced dataset's path


def test_bilinear_resize_rounding_is_clamped(ckpt):
    x = torch.rand(1, 16, 16)
    small = v2.Resize((8, 8), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)(x)
    assert 0 <= float(DKGMAugment(ckpt, seed=0)(small).min())
    nudged = x.clone()
    nudged[0, 0, 0], nudged[0, 0, 1] = -RANGE_TOL / 2, 1 + RANGE_TOL / 2
    out = to_unit_float(nudged)
    assert out.min() == 0 and out.max() == 1 and nudged[0, 0, 0] < 0      # input not clamped in place


# -- 3. NaN is found before p ------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_refused_at_p0_and_in_any_batch(ckpt, bad):
    x = torch.rand(4, 1, 8, 8)
    x[2, 0, 3, 3] = bad
    with pytest.raises(DataError, match="NaN or inf"):
        DKGMAugment(ckpt, p=0.0)(x[2])
    for seed in range(6):                          # p=0.5 used to return it unchanged for some seeds
        with pytest.raises(DataError, match="NaN or inf"):
            DKGMAugment(ckpt, p=0.5, seed=seed)(x)
    img = x[2].permute(1, 2, 0).numpy()
    for seed in range(6):
        with pytest.raises(DataError, match="NaN or inf"):
            album(ckpt, img, p=0.5, seed=seed)
    with pytest.raises(DataError, match="NaN or inf"):
        album(ckpt, img, p=0.0)


# -- 4. images far larger than the generator's training size -----------------------------------
def test_huge_images_are_refused_and_large_ones_warn(ckpt):
    side = int((MAX_PIXELS * 64) ** 0.5) + 1                   # the micro generator is 8x8
    with pytest.raises(DataError, match="Resize"):
        DKGMAugment(ckpt, p=0.0)(torch.rand(1, side, side))
    with pytest.raises(DataError, match="Resize"):
        album(ckpt, np.random.default_rng(0).random((side, side), dtype=np.float32))
    warn_side = int((WARN_PIXELS * 64) ** 0.5) + 1
    with pytest.warns(UserWarning, match="training size"):
        DKGMAugment(ckpt, seed=0)(torch.rand(1, warn_side, warn_side))


def test_generators_without_image_size_skip_the_size_check(ckpt):
    import dkgm_aug
    model = dkgm_aug.load(ckpt)
    del model.image_size
    assert DKGMAugment(model, seed=0)(torch.rand(1, 80, 80)).shape == (1, 80, 80)


# -- 5-7. arguments refused at construction ----------------------------------------------------
@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("kwargs, match", [(dict(steps=10 ** 6), "steps"), (dict(alpha=1e30), "alpha"),
                                           (dict(alpha=float("nan")), "alpha")])
def test_knobs_are_bounded_in_both_twins(ckpt, twin, kwargs, match):
    with pytest.raises(DKGMError, match=match):
        twin(ckpt, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_is_refused_at_construction(ckpt):
    with pytest.raises(DKGMError, match="CUDA is not available"):
        DKGMAugment(ckpt, device="cuda")


@pytest.mark.parametrize("seed", [2 ** 70, -1, 2 ** 63, 1.5, True])
def test_bad_seeds_are_refused(ckpt, seed):
    with pytest.raises(DKGMError, match="seed"):
        DKGMAugment(ckpt, seed=seed)


def test_seed_edges_and_generators_work(ckpt):
    x = torch.rand(1, 8, 8)
    assert DKGMAugment(ckpt, seed=2 ** 63 - 1)(x).shape == x.shape
    a = DKGMAugment(ckpt, seed=torch.Generator().manual_seed(4))(x)
    assert torch.equal(a, DKGMAugment(ckpt, seed=torch.Generator().manual_seed(4))(x))


# -- 8. channels-last tensors ------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (2, 8, 8, 1)])
def test_hwc_tensor_is_named(ckpt, shape):
    with pytest.raises(DataError, match=r"looks like HWC.*permute"):
        DKGMAugment(ckpt, p=0.0)(torch.rand(shape))
    with pytest.raises(DataError, match="looks like HWC"):
        to_unit_float(torch.rand(shape))


# -- 9. one load for many threads --------------------------------------------------------------
def test_threads_share_one_load(ckpt, monkeypatch):
    loads, real = [], tvt.load_generator

    def slow_load(spec, device=None):
        loads.append(spec)
        time.sleep(0.05)                           # widen the race the lock closes
        return real(spec, device)
    monkeypatch.setattr(tvt, "load_generator", slow_load)
    t = DKGMAugment(ckpt, seed=0)
    errors = []

    def work():
        try:
            t(torch.rand(1, 8, 8))
        except Exception as exc:                   # noqa: BLE001 -- reported below
            errors.append(exc)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(loads) == 1


def test_handle_pickles_without_its_lock(ckpt):
    t = DKGMAugment(ckpt, seed=0)
    x = torch.rand(1, 8, 8)
    t(x)
    copy = pickle.loads(pickle.dumps(t))
    assert copy.handle._model is None
    assert torch.equal(copy(x), pickle.loads(pickle.dumps(t))(x))


# -- 10. albumentations serialisation ----------------------------------------------------------
def test_albumentations_round_trip(ckpt):
    import albumentations as A
    pipeline = A.Compose([dalb.DKGMAugment(ckpt, alpha=0.3, steps=2, p=1.0)])
    again = A.from_dict(A.to_dict(pipeline))
    img = np.random.default_rng(0).random((8, 8, 1), dtype=np.float32)
    pipeline.set_random_seed(5)
    again.set_random_seed(5)
    out = pipeline(image=img)["image"]
    assert np.array_equal(out, again(image=img)["image"]) and not np.array_equal(out, img)
    assert again.transforms[0].steps == 2 and again.transforms[0].alpha == 0.3


def test_albumentations_model_object_is_not_serialisable(ckpt):
    import albumentations as A
    import dkgm_aug
    t = dalb.DKGMAugment(dkgm_aug.load(ckpt))
    assert "DKGM" in repr(t)
    with pytest.raises(DKGMError, match="model object"):
        A.to_dict(t)


# -- properties --------------------------------------------------------------------------------
@FUZZ
@given(data=st.data(), batched=st.booleans(), p=st.floats(0, 1), seed=st.integers(0, 2 ** 31))
def test_property_any_bad_value_fails_at_any_p(ckpt, data, batched, p, seed):
    shape = (3, 1, 6, 6) if batched else (1, 6, 6)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    bad = data.draw(st.one_of(st.sampled_from([float("nan"), float("inf"), -float("inf")]),
                              st.floats(-1e6, -0.01), st.floats(1.01, 1e6)))
    x.view(-1)[data.draw(st.integers(0, x.numel() - 1))] = bad
    with pytest.raises(DataError, match="NaN or inf|must be in"):
        DKGMAugment(ckpt, p=p, seed=seed)(x)


@FUZZ
@given(h=st.integers(1, 12), w=st.integers(1, 12), n=st.integers(1, 3), seed=st.integers(0, 2 ** 31))
def test_property_annotations_never_change(ckpt, h, w, n, seed):
    g = torch.Generator().manual_seed(seed)
    img = tv_tensors.Image(torch.rand(1, h, w, generator=g))
    mask = tv_tensors.Mask(torch.randint(0, 2, (n, h, w), generator=g))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[0, 0, w, h]] * n), format="XYXY", canvas_size=(h, w))
    out, out_mask, out_boxes, label = DKGMAugment(ckpt, seed=seed)(img, mask, boxes, 7)
    assert out_mask is mask and out_boxes is boxes and label == 7
    assert out.shape == img.shape and 0 <= out.min() and out.max() <= 1
