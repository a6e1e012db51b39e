"""Every registered generator kind follows dkgm_aug.augment.Generator: the same checks for
all of them, so a new kind is tested by adding a tiny instance to TINY below."""
import copy

import pytest
import torch

import dkgm_aug
from dkgm_aug.augment import Generator
from dkgm_aug.checkpoint import model_kinds
from dkgm_aug.kss import KernelSmoothedScore
from dkgm_aug.vae import EVAE, VAE
from conftest import micro_model, shapes_batch

SIZE = 8
# narrower networks can start with every ReLU dead: one grey image whatever the seed
VAE_TINY = dict(channels=1, image_size=SIZE, d_z=3, widths=(8, 8, 16, 16))


def tiny_kss():
    images = (shapes_batch(10, size=SIZE, seed=1) * 255).round().to(torch.uint8)
    return KernelSmoothedScore(images, [0, 1] * 5, h=0.3, steps=3, n_smooth=2)


def untrained_dkgm():
    model = micro_model(image_size=SIZE)
    with torch.no_grad():           # the U-Nets' output convs start at zero: every output would be 0
        for net in (model.stage1, model.stage2):
            torch.nn.init.normal_(net.conv_out.weight, std=0.5)
    return model


TINY = {
    "dkgm": untrained_dkgm,
    "evae": lambda: EVAE(**VAE_TINY),
    "vae": lambda: VAE(**VAE_TINY),
    "kss": tiny_kss,
}


@pytest.mark.parametrize("kind", sorted(model_kinds()))
def test_generator_protocol(kind, tmp_path):
    assert kind in TINY, f"no tiny {kind!r} instance here: add one to TINY"
    torch.manual_seed(0)
    model = TINY[kind]().eval()
    assert isinstance(model, Generator) and type(model) is model_kinds()[kind] and model.kind == kind

    x = shapes_batch(4, size=SIZE, seed=2) * 2 - 1
    x_before = x.clone()
    seeds, labels = [11, 12, 13, 14], [0, 1, 1, 0]
    out = model.neighbours_from_seeds(x, seeds, labels=labels)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, model.neighbours_from_seeds(x, seeds, labels=labels))
    assert not torch.equal(out, model.neighbours_from_seeds(x, [s + 100 for s in seeds], labels=labels))
    # image i with seed s: the same alone, in another split, or in another order. In float64,
    # where the rounding of batched convolutions and matmuls (1e-6 in float32) is far below
    # the tolerance, while a seed given to the wrong image changes the result by O(1).
    m64, x64 = copy.deepcopy(model).double(), x.double()
    whole = m64.neighbours_from_seeds(x64, seeds, labels=labels)
    alone = torch.cat([m64.neighbours_from_seeds(x64[i:i + 1], seeds[i:i + 1], labels=labels[i:i + 1])
                       for i in range(4)])
    pairs = torch.cat([m64.neighbours_from_seeds(x64[i:i + 2], seeds[i:i + 2], labels=labels[i:i + 2])
                       for i in (0, 2)])
    order = [2, 0, 3, 1]
    shuffled = m64.neighbours_from_seeds(x64[order], [seeds[i] for i in order], labels=[labels[i] for i in order])
    for other in (alone, pairs, shuffled[torch.tensor(order).argsort()]):
        assert torch.allclose(other, whole, rtol=0, atol=1e-12)
    many = model.neighbours(x, 2, labels=labels, generator=torch.Generator().manual_seed(0))
    assert many.shape == (4, 2, *x.shape[1:])

    path = tmp_path / f"{kind}.safetensors"
    model.save(path)
    loaded = dkgm_aug.load(path)
    assert type(loaded) is type(model) and loaded.config() == model.config()
    assert torch.equal(loaded.neighbours_from_seeds(x, seeds, labels=labels), out)
    assert torch.equal(x, x_before)
