import math

import pytest
import torch

from dkgm_aug import DKGMError, sharpness
from dkgm_aug.blur import gaussian_blur, random_blur
from dkgm_aug.kernels import noise, standard_epanechnikov


def test_epanechnikov_moments_and_support():
    k = standard_epanechnikov((400_000,), torch.Generator().manual_seed(0))
    assert k.min() >= -1 and k.max() <= 1
    # mean 0, variance 1/5; standard errors are ~7e-4 and ~3e-4 at this n
    assert abs(k.mean().item()) < 4e-3
    assert abs(k.var().item() - 0.2) < 2e-3
    # density 3/4 (1 - k^2): P(|k| < 0.5) = 11/16
    assert abs((k.abs() < 0.5).float().mean().item() - 11 / 16) < 4e-3


@pytest.mark.parametrize("kernel", ["gaussian", "epanechnikov"])
def test_noise_has_unit_variance_and_is_seeded(kernel):
    a = noise((200_000,), kernel, torch.Generator().manual_seed(1))
    b = noise((200_000,), kernel, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert abs(a.std().item() - 1) < 1e-2
    if kernel == "epanechnikov":
        assert a.abs().max() <= math.sqrt(5) + 1e-6


# noise_from_seeds (the per-image seeded, counter-based noise) is tested in test_seeded_noise.py


def test_unknown_kernel():
    with pytest.raises(DKGMError, match="unknown kernel"):
        noise((3,), "laplace")


def test_blur_matches_explicit_kernel():
    x = torch.zeros(1, 1, 15, 15)
    x[0, 0, 7, 7] = 1.0
    b = 0.8
    y = gaussian_blur(x, b)
    r = math.ceil(3 * b)
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * b * b))
    k = k / k.sum()
    expected = torch.zeros(15, 15)
    expected[7 - r:8 + r, 7 - r:8 + r] = k[:, None] * k[None, :]
    assert torch.allclose(y[0, 0], expected, atol=1e-6)


def test_blur_per_image_sigma_and_constant_images():
    x = torch.rand(3, 2, 10, 10)
    y = gaussian_blur(x, torch.tensor([0.5, 1.0, 2.0]))
    for i, s in enumerate([0.5, 1.0, 2.0]):
        assert torch.allclose(y[i:i + 1], gaussian_blur(x[i:i + 1], s), atol=1e-6)
    const = torch.full((2, 1, 6, 6), 0.3)
    assert torch.allclose(gaussian_blur(const, 2.5), const)   # radius > size: replicate padding
    assert not torch.equal(random_blur(x, (0.5, 1.0), torch.Generator().manual_seed(0)), x)


def test_sharpness_hand_computed():
    img = torch.zeros(1, 1, 3, 4)
    img[0, 0, 1, 1] = 1.0
    # Laplacian responses (valid): centre (1,1) -> -4, centre (1,2) -> 1; variance of [-4, 1]
    assert sharpness(img) == pytest.approx(torch.tensor([-4.0, 1.0]).var(correction=0).item())
    rgb = torch.rand(2, 3, 8, 8)
    gray = (0.299 * rgb[:, :1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:])
    assert sharpness(rgb) == pytest.approx(sharpness(gray), rel=1e-5)
    assert sharpness(gaussian_blur(rgb, 1.0)) < sharpness(rgb)
    with pytest.raises(DKGMError):
        sharpness(torch.rand(2, 8, 8))


def test_blur_of_an_image_does_not_depend_on_the_rest_of_its_batch():
    """An 8x8 image blurred at b = 0.6 (radius 2: reflect padding) gives the same result alone and
    beside an image at b = 3 (radius 9 > 8: replicate padding); the whole batch used to switch to
    replicate."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 8, 8, generator=g)
    alone = gaussian_blur(x[:1], torch.tensor([0.6]))
    both = gaussian_blur(x, torch.tensor([0.6, 3.0]))
    assert torch.allclose(both[:1], alone, atol=1e-6)
    assert torch.allclose(both[1:], gaussian_blur(x[1:], torch.tensor([3.0])), atol=1e-6)


def test_blur_of_a_batch_mixing_unblurred_and_wide_images():
    """sigma <= 0 leaves an image as it is, also beside an image blurred past its own size."""
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = gaussian_blur(x, torch.tensor([-1.0, 5.0]))
    assert torch.allclose(y[0], x[0]) and torch.isfinite(y).all()


def test_metrics_read_each_image_type_on_its_own_scale():
    """sharpness read uint8 as 0..255 (65,025x the [0, 1] value); features/neighbour_quality scored
    [-1, 1] images (a generator's sample()) as [0, 1] ones; nearest_neighbour_distances compared
    [0, 1] floats with uint8 read as [-1, 1] (exact copies scored memorisation 0.0), all silently."""
    from dkgm_aug import DataError
    from dkgm_aug.features import neighbour_quality
    from dkgm_aug.label_filter import load_evaluator
    from dkgm_aug.metrics import memorisation
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (6, 1, 8, 8), generator=g, dtype=torch.uint8)
    assert sharpness(x8) == pytest.approx(sharpness(x8.float() / 255))
    with pytest.raises(DataError, match="negative values"):
        sharpness(x8.float() / 127.5 - 1)
    net = load_evaluator("digits-evaluator")
    with pytest.raises(DataError, match="negative values"):
        neighbour_quality(net, x8.float() / 127.5 - 1, torch.zeros(6, dtype=torch.long), torch.randn(6, 32))
    assert memorisation(x8.float() / 127.5 - 1, x8) == 1.0          # one scale: copies are copies
    with pytest.warns(UserWarning, match="different scales"):
        memorisation(x8.float() / 255, x8)
