import pytest
import torch

from dkgm_aug import PRESETS, DKGMError, UNet
from dkgm_aug.unet import UNetConfig, preset_config


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("time_input", [False, True])
def test_preset_forward_backward(name, time_input):
    torch.manual_seed(0)
    net = UNet(preset_config(name, channels=3, time_input=time_input))
    x = torch.randn(2, 3, 12, 12)
    # zero-initialised output conv: perturb so gradients reach every parameter
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    for m in net.modules():
        if hasattr(m, "conv2"):
            torch.nn.init.normal_(m.conv2.weight, std=0.1)
        if hasattr(m, "proj"):
            torch.nn.init.normal_(m.proj.weight, std=0.1)
    out = net(x, torch.tensor([0, 3])) if time_input else net(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_tiny_is_small_and_cifar_matches_paper():
    assert n_params(UNet(preset_config("tiny", 1, True))) < 1_000_000
    # The DKGM paper's CIFAR-10 U-Net (DDPM's) has 35.7M parameters.
    cifar = n_params(UNet(preset_config("cifar", 3, True)))
    assert cifar == 35_746_307


@pytest.mark.parametrize("size", [(1, 1), (7, 9), (28, 28), (13, 32)])
def test_any_image_size(size):
    net = UNet(UNetConfig(channels=2, base_channels=8, channel_mult=(1, 2, 2), time_input=True))
    x = torch.randn(3, 2, *size)
    assert net(x, 1).shape == x.shape


def test_blocks_start_as_identity_and_output_starts_at_zero():
    net = UNet(UNetConfig(channels=1, base_channels=8, time_input=False))
    assert torch.count_nonzero(net(torch.randn(2, 1, 8, 8))) == 0


def test_errors():
    with pytest.raises(DKGMError, match="unknown preset"):
        preset_config("huge", 1, False)
    with pytest.raises(DKGMError, match="time step"):
        UNet(UNetConfig(time_input=True))(torch.zeros(1, 1, 8, 8))
    with pytest.raises(DKGMError, match="unknown U-Net config keys"):
        UNetConfig.from_dict({"bogus": 1})
    assert set(PRESETS) >= {"tiny", "small", "cifar"}
