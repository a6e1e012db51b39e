"""dkgm_aug.images, the one place for conversions: every input kind to a [0, 1] batch and back."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from torchvision import tv_tensors

from dkgm_aug import DataError
from dkgm_aug.images import (RANGE_TOL, from_model, tensor_unit, to_batch, to_model, to_uint8, to_unit_float,
                             to_unit_hwc, uint8_to_model)

KINDS = ("chw", "bchw", "tv_image", "pil", "numpy_hw", "numpy_hwc")


def pixels(seed, b, c, h, w):
    """uint8 [b, c, h, w] pixels with 0 and 255 in them."""
    x = np.random.default_rng(seed).integers(0, 256, (b, c, h, w), dtype=np.uint8)
    x.flat[0], x.flat[-1] = 0, 255
    return x


def make(kind, px, dtype):
    """``px`` (uint8 [b, c, h, w]) as an input of ``kind``, uint8 or float (``dtype``) in [0, 1]."""
    if kind in ("chw", "bchw", "tv_image"):
        x = torch.from_numpy(px if kind == "bchw" else px[0])
        x = x if dtype == torch.uint8 else x.to(dtype) / 255
        return tv_tensors.Image(x) if kind == "tv_image" else x
    hwc = px[0].transpose(1, 2, 0)
    if kind == "pil":
        return Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    arr = np.ascontiguousarray(hwc[..., 0] if kind == "numpy_hw" else hwc)
    return arr if dtype == torch.uint8 else (arr / np.float32(255)).astype(np.float32)


def copy_of(x):
    return np.array(x) if isinstance(x, Image.Image) else x.copy() if isinstance(x, np.ndarray) else x.clone()


def values(x) -> np.ndarray:
    return np.asarray(x) if isinstance(x, Image.Image) else x.numpy() if isinstance(x, torch.Tensor) else x


inputs = st.builds(
    lambda kind, uint8, f64, seed, b, c, h, w: (kind, pixels(seed, b if kind == "bchw" else 1,
                                                             1 if kind == "numpy_hw" else c, h, w),
                                                torch.uint8 if uint8 or kind == "pil" else
                                                torch.float64 if f64 and kind in ("chw", "bchw") else torch.float32),
    st.sampled_from(KINDS), st.booleans(), st.booleans(), st.integers(0, 2 ** 32 - 1),
    st.integers(1, 3), st.sampled_from([1, 3]), st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=150, deadline=None)
@given(case=inputs)
def test_to_batch_gives_a_unit_batch_and_restore_round_trips(case):
    kind, px, dtype = case
    x = make(kind, px, dtype)
    before = copy_of(x)
    x01, restore = to_batch(x)
    assert x01.dtype == torch.float32 and tuple(x01.shape) == px.shape
    assert float(x01.min()) >= 0 and float(x01.max()) <= 1
    # every kind reads the same pixels to the same floats: one conversion, whatever the input
    assert torch.equal(x01, torch.from_numpy(px).float() / 255) if dtype == torch.uint8 else \
        torch.allclose(x01, torch.from_numpy(px).double().div(255).float(), rtol=0, atol=1e-7)
    back = restore(x01)
    assert type(back) is type(x) and np.array_equal(values(x), values(before))     # input not mutated
    if isinstance(x, Image.Image):
        assert back.mode == x.mode and back.size == x.size and np.array_equal(np.asarray(back), np.asarray(x))
        return
    assert back.dtype == x.dtype and back.shape == x.shape
    if dtype == torch.uint8:
        assert np.array_equal(values(back), values(x))
    else:
        assert np.abs(values(back).astype(np.float64) - values(x).astype(np.float64)).max() <= 1e-7


@settings(max_examples=50, deadline=None)
@given(case=inputs)
def test_the_one_image_readers_agree(case):
    kind, px, dtype = case
    x = make(kind, px, dtype)
    if kind in ("bchw", "numpy_hw"):
        return
    x01 = to_batch(x)[0][0]
    assert torch.equal(to_unit_float(x), x01)
    if isinstance(x, np.ndarray):
        assert torch.equal(to_unit_hwc(x).permute(2, 0, 1), x01)


def test_uint8_levels_round_trip_and_match_the_numpy_formula():
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(tensor_unit(levels)), levels)
    as_numpy = levels.numpy().astype(np.float32) / 255.0          # albumentations' former formula
    assert np.array_equal(tensor_unit(levels).numpy(), as_numpy)
    assert np.array_equal(to_unit_hwc(levels.numpy()[None]).numpy()[0], as_numpy)


def test_rounding_outside_the_range_is_clamped_on_a_copy():
    x = torch.full((1, 4, 4), 0.5)
    x[0, 0, 0], x[0, 0, 1] = -RANGE_TOL / 2, 1 + RANGE_TOL / 2
    x01, restore = to_batch(x)
    assert float(x01.min()) == 0 and float(x01.max()) == 1 and float(x[0, 0, 0]) < 0


BAD = [
    ("int32 tensor", torch.zeros(1, 8, 8, dtype=torch.int32),
     r"tensor images must be uint8 or float in \[0, 1\], got torch.int32"),
    ("float in [0, 255]", torch.full((1, 8, 8), 200.0), r"float images must be in \[0, 1\].*divide by 255"),
    ("negative floats", torch.full((1, 8, 8), -0.4), r"float images must be in \[0, 1\].*before Normalize"),
    ("NaN", torch.full((1, 8, 8), float("nan")), "NaN or inf"),
    ("2-D tensor", torch.rand(8, 8), r"tensor images must be CHW or BCHW, got shape \(8, 8\)"),
    ("5-D tensor", torch.rand(1, 1, 1, 8, 8), "CHW or BCHW"),
    ("empty image", torch.zeros(1, 0, 8), r"empty image tensor of shape \(1, 0, 8\)"),
    ("empty batch", torch.zeros(0, 1, 8, 8), "empty image tensor"),
    ("HWC tensor", torch.rand(8, 8, 3), "looks like HWC"),
    ("video", tv_tensors.Video(torch.rand(2, 1, 8, 8)), "does not augment a tv_tensors.Video"),
    ("RGBA PIL image", Image.new("RGBA", (8, 8)), r"mode 'L' or 'RGB', got 'RGBA'"),
    ("float64 numpy", np.zeros((8, 8), np.float64), r"images must be uint8 or float32 in \[0, 1\], got float64"),
    ("float numpy in [0, 255]", np.full((8, 8), 200, np.float32), "divide by 255"),
    ("empty numpy", np.zeros((0, 8), np.uint8), r"non-empty numpy HxW or HxWxC image, got \(0, 8\)"),
    ("4-D numpy", np.zeros((2, 8, 8, 1), np.uint8), r"expected a numpy HxW or HxWxC image, got shape \(2, 8, 8, 1\)"),
    ("list", [[0.5]], "cannot augment a list"),
]


@pytest.mark.parametrize("what, x, message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_a_data_error_that_names_the_problem(what, x, message):
    with pytest.raises(DataError, match=message):
        to_batch(x)


@pytest.mark.parametrize("x, message", [
    (torch.zeros(1, 8, 8, dtype=torch.int64), r"images must be uint8 or float in \[0, 1\], got torch.int64"),
    (torch.full((1, 8, 8), 2.0), "divide by the scale.s maximum"),
    (torch.full((1, 8, 8), 200.0), "divide by 255"),
    (np.full((8, 8, 1), np.inf, np.float64), "NaN or inf"),
    ("image.png", "cannot read an image from str")])
def test_to_unit_float_refuses_with_the_same_rule(x, message):
    with pytest.raises(DataError, match=message):
        to_unit_float(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uint8_to_model_round_trips_every_level(dtype):
    levels = torch.arange(256, dtype=torch.uint8)
    before = levels.clone()
    x = uint8_to_model(levels, dtype)
    assert x.dtype == dtype and x.device == levels.device and x.shape == levels.shape
    assert float(x[0]) == -1 and float(x[-1]) == 1 and bool((x[1:] > x[:-1]).all())      # [-1, 1], in order
    assert torch.equal(to_uint8(from_model(x)), levels)                                   # exact round trip
    assert torch.equal(levels, before)                                                    # input not mutated
    # the same values as the two-step path, bit for bit, and as the hand-written formula it replaces
    assert torch.equal(x, to_model(levels.to(dtype) / 255.0)) and torch.equal(x, levels.to(dtype) / 127.5 - 1)
    assert torch.equal(uint8_to_model(levels), to_model(tensor_unit(levels)))            # float32 by default


def test_uint8_to_model_refuses_other_dtypes():
    with pytest.raises(DataError, match="expected uint8 images, got torch.float32"):
        uint8_to_model(torch.zeros(2, 3))


def test_tensor_unit_without_check_casts_floats_as_they_are():
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(tensor_unit(levels, check=False), tensor_unit(levels))           # uint8: the same rule
    assert torch.equal(to_uint8(tensor_unit(levels, check=False)), levels)
    x = torch.tensor([-0.5, 0.25, 1 + RANGE_TOL / 2, 3.0], dtype=torch.float64)
    before = x.clone()
    y = tensor_unit(x, check=False)
    assert y.dtype == torch.float32 and torch.equal(y, x.float()) and torch.equal(x, before)   # no clamp, no copy back
    with pytest.raises(DataError, match=r"float images must be in \[0, 1\]"):
        tensor_unit(x)                                                                     # the checked rule refuses it
    with pytest.raises(DataError, match=r"must be uint8 or float in \[0, 1\], got torch.int64"):
        tensor_unit(torch.zeros(3, dtype=torch.int64), check=False)


def test_to_model_and_from_model_are_inverse_on_every_level():
    x01 = tensor_unit(torch.arange(256, dtype=torch.uint8))
    x = to_model(x01)
    assert x.dtype == torch.float32 and float(x.min()) == -1 and float(x.max()) == 1
    assert torch.equal(to_uint8(from_model(x)), torch.arange(256, dtype=torch.uint8))
    assert torch.equal(from_model(torch.tensor([-1.5, 1.5])), torch.tensor([0.0, 1.0]))   # clamped to [0, 1]


def test_pil_images_in_other_modes_are_read_as_their_colours_not_their_raw_planes():
    """to_unit_float (the trainer's and the fingerprint's reader) read any PIL mode with np.asarray: a
    palette image became its palette indices as gray levels (white index 0 read as black), a YCbCr
    image's planes became R, G, B, a 16-bit one was cut to 8 bits. They now go through the one
    conversion that BalancedDKGMDataset uses (source_unit)."""
    from PIL import Image
    from dkgm_aug.images import collate_images, to_unit_float
    pal = Image.new("P", (4, 4))
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)     # index 0 = white, 1 = black
    pal.putpixel((0, 0), 1)
    rgb = pal.convert("RGB")
    assert torch.equal(to_unit_float(pal), to_unit_float(rgb))
    assert float(to_unit_float(pal)[:, 1, 1].min()) == 1.0     # white, not index 0
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    assert torch.allclose(to_unit_float(red.convert("YCbCr")), to_unit_float(red), atol=2 / 255)
    wide = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert float(to_unit_float(wide).min()) == 1.0
    assert collate_images([(pal, 0), (rgb, 1)]).shape == (2, 3, 4, 4)


def test_the_binary_uint8_check_is_image_by_image():
    """A uint8 image holding only 0 and 1 is refused whatever its batchmates (the check looked at the
    batch's maximum, so one binary image passed beside a bright one); images under 64 values pass."""
    from dkgm_aug.images import check_not_binary
    dark = torch.zeros(1, 8, 8, dtype=torch.uint8)
    dark[0, 0, 0] = 1
    bright = torch.full((1, 8, 8), 200, dtype=torch.uint8)
    for x in (dark, torch.stack([bright, dark]), dark.permute(1, 2, 0), torch.stack([dark.permute(1, 2, 0)] * 2)):
        with pytest.raises(DataError, match="only the values 0 and 1"):
            check_not_binary(x)
    check_not_binary(torch.stack([bright, bright]))
    check_not_binary(dark[:, :4, :4])                       # 16 values: a tiny image may be all 0 and 1
    assert torch.equal(tensor_unit(dark, check=False), dark.float() / 255)   # the library's own uint8: not checked


def test_data_on_a_0_to_16_scale_gets_the_right_hint_and_a_warning_when_read_as_8_bit():
    """sklearn's digits (0 .. 16): the range error said 'divide by 255 (or pass it as uint8)', and
    both were taken in silence as near-black images, which the generator turned into other digits."""
    import warnings
    from sklearn.datasets import load_digits
    raw = torch.as_tensor(load_digits().images[:4], dtype=torch.float32)[:, None]
    with pytest.raises(DataError, match="0 .. 16 scale.*divide by the scale's maximum \\(16 there"):
        to_batch(raw)
    for wrong in (raw / 255, raw.to(torch.uint8)):
        with pytest.warns(UserWarning, match="near-black as read.*divided by 16"):
            to_batch(wrong)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_batch(raw / 16)
        to_batch((raw * 255 / 16).round().to(torch.uint8))
        to_batch(torch.zeros(1, 8, 8))                                    # black, not a small scale
        mixed = (raw * 255 / 16).round().to(torch.uint8)
        mixed[0] = mixed[0] // 16                                         # one dark image among bright ones
        to_batch(mixed)
        to_batch(mixed[0]), to_batch(mixed[:1].float() / 255)             # ... or alone (per-sample paths)
