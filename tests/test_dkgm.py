import pytest
import torch
from torch import nn

from dkgm_aug import DKGM, DataError, DKGMError, sharpness
from dkgm_aug.blur import gaussian_blur
from dkgm_aug.kernels import noise
from conftest import micro_model, shapes_batch


class HandNet(nn.Module):
    """u(z, t) = 0.1 (t + 1) z + t, recording every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, t=None):
        self.calls.append((z.clone(), t))
        return 0.1 * (t + 1) * z + t if t is not None else 2 * z


def test_debias_is_the_design_update(micro):
    micro.stage2 = HandNet()
    x_in = torch.randn(2, 1, 4, 4)
    u = lambda z, t: 0.1 * (t + 1) * z + t
    x0 = u(x_in, 0)
    x1 = x0 + u(x_in - x0, 1) / 1
    x2 = x1 + u(x_in - x1, 2) / 2
    x3 = x2 + u(x_in - x2, 3) / 3
    out = micro.debias(x_in, steps=3)
    assert torch.allclose(out, x3, atol=1e-6)
    # the network sees x_in, then x_in - x_hat_{t-1} (Algorithm 2's form), with t = 0, 1, 2, 3
    assert [t for _, t in micro.stage2.calls] == [0, 1, 2, 3]
    assert torch.allclose(micro.stage2.calls[2][0], x_in - x1)
    assert torch.allclose(micro.debias(x_in, steps=0), x0)


def test_sample_is_stage2_of_stage1(micro):
    micro.stage1, micro.stage2 = HandNet(), HandNet()
    x = torch.rand(3, 1, 5, 5) * 2 - 1
    eps = noise(x.shape, "gaussian", torch.Generator().manual_seed(7))
    kde = 2 * (x + 0.3 * eps)
    assert torch.allclose(micro.kde(x, alpha=0.3, generator=torch.Generator().manual_seed(7)), kde)
    expected = micro.debias(kde, steps=2).clamp(-1, 1)
    got = micro.sample(x, alpha=0.3, steps=2, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(got, expected, atol=1e-6)


def test_stage1_loss_is_eq14_with_m_copies():
    model = micro_model(m=3, alpha_train=0.2, kernel="epanechnikov")
    model.stage1 = HandNet()
    x = torch.rand(2, 1, 4, 4)
    eps = noise((6, 1, 4, 4), "epanechnikov", torch.Generator().manual_seed(3))
    xm = x.repeat(3, 1, 1, 1)
    per = (xm - 2 * (xm + 0.2 * eps)).pow(2).flatten(1).mean(1).view(3, 2)
    loss = model(x, stage=1, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(loss, per.sum(0).mean())


def test_stage2_loss_targets_the_clean_image(micro):
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(0)
    loss = micro(x, stage=2, generator=g)
    # the U-Net's output conv starts at zero, so x_hat_n = 0 and the loss is mean(x^2)
    assert torch.allclose(loss, x.pow(2).mean())


def test_neighbours_shape_seed_and_range(micro):
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    for net in (micro.stage1, micro.stage2):
        torch.nn.init.normal_(net.conv_out.weight, std=0.5)
    a = micro.neighbours(x, k=4, generator=torch.Generator().manual_seed(0))
    b = micro.neighbours(x, k=4, generator=torch.Generator().manual_seed(0))
    c = micro.neighbours(x, k=4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 4, 1, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a[:, 0], a[:, 1])   # k different draws per image


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 3, 8, 8), "channels"),
    (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
    (torch.zeros(0, 1, 8, 8), "empty"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "float"),
    (torch.zeros(1, 8, 8), "shape"),
])
def test_bad_images(micro, bad, match):
    with pytest.raises(DataError, match=match):
        micro.sample(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=-1.0), "alpha"), (dict(alpha=float("nan")), "alpha"), (dict(steps=-1), "steps"),
    (dict(steps=1.5), "steps")])
def test_bad_knobs(micro, kwargs, match):
    with pytest.raises(DKGMError, match=match):
        micro.sample(torch.zeros(1, 1, 8, 8), **kwargs)


def test_bad_construction():
    with pytest.raises(DKGMError, match="kernel"):
        micro_model(kernel="box")
    with pytest.raises(DKGMError, match="b_range"):
        micro_model(b_range=(1.0, 0.5))
    with pytest.raises(DKGMError, match="stage must be"):
        micro_model()(torch.zeros(1, 1, 8, 8), stage=3)
    with pytest.raises(DKGMError, match="unknown preset"):
        DKGM.from_preset("enormous")


@pytest.mark.slow
def test_stage2_training_debiases_blurred_data():
    """150 stage-2 steps on blurred synthetic images: the output is closer (MSE) to the clean
    images than the blurred input was, and sharper (the paper's direction)."""
    torch.manual_seed(0)
    model = micro_model(image_size=12, steps=2)
    train = shapes_batch(512, size=12, seed=1) * 2 - 1
    opt = torch.optim.Adam(model.stage2.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        idx = torch.randint(0, len(train), (16,), generator=g)
        loss = model(train[idx], stage=2, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clean = shapes_batch(64, size=12, seed=2) * 2 - 1   # held-out images
    blurred = gaussian_blur(clean, 0.75)
    with torch.no_grad():
        restored = model.debias(blurred).clamp(-1, 1)
    mse_in, mse_out = (blurred - clean).pow(2).mean(), (restored - clean).pow(2).mean()
    assert mse_out < 0.5 * mse_in, (mse_in, mse_out)
    to01 = lambda z: (z + 1) / 2
    assert sharpness(to01(restored)) > 2 * sharpness(to01(blurred))


def test_sample_return_stages_matches_the_two_stages(micro):
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    s1, s12 = micro.sample(x, generator=torch.Generator().manual_seed(0), return_stages=True)
    with torch.inference_mode():
        kde = micro.kde(x, generator=torch.Generator().manual_seed(0))
        assert torch.equal(s1, kde.clamp(-1, 1)) and torch.equal(s12, micro.debias(kde).clamp(-1, 1))
    assert torch.equal(s12, micro.sample(x, generator=torch.Generator().manual_seed(0)))
