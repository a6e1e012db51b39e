"""The opt-in class-conditional DKGM: the label pathway of the U-Net, labels through every DKGM
method, the ``with_labels`` warm start, checkpoints, the Trainer, DKGMAugment and the CLI."""
import copy
import hashlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

import dkgm_aug
import dkgm_aug.albumentations as dalb
from dkgm_aug import DKGM, DataError, DKGMError, Trainer, UNet, UNetConfig
from dkgm_aug.cli import main
from dkgm_aug.nn import ResBlock
from dkgm_aug.train.data import data_fingerprint
from dkgm_aug.transforms import DKGMAugment
from conftest import micro_model, shapes_batch

CFG = dict(channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,))


def cond_micro(num_classes=3, stages=(1, 2), image_size=8, **knobs) -> DKGM:
    n = {s: num_classes if s in stages else 0 for s in (1, 2)}
    return DKGM(UNetConfig(**CFG, time_input=False, num_classes=n[1]),
                UNetConfig(**CFG, time_input=True, num_classes=n[2]), image_size=image_size, **knobs)


def lively(model, seed=0):
    """Non-zero output and residual convs, so that outputs depend on the input, noise and label."""
    torch.manual_seed(seed)
    for net in (model.stage1, model.stage2):
        nn.init.normal_(net.conv_out.weight, std=0.5)
        for block in net.modules():
            if isinstance(block, ResBlock):
                nn.init.normal_(block.conv2.weight, std=0.2)
    return model.eval()


def images(n=4, size=8, seed=0):
    return shapes_batch(n, size=size, seed=seed) * 2 - 1


def eps_like(x, seed=1):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cond") / "cond.safetensors"
    lively(cond_micro()).save(path)
    return str(path)


# -- the model ----------------------------------------------------------------------------------
def test_unet_label_pathway():
    net = UNet(UNetConfig(**CFG, time_input=False, num_classes=5))
    assert isinstance(net.label_emb, nn.Embedding) and net.label_emb.weight.shape == (5, 32)
    blocks = [b for b in net.modules() if isinstance(b, ResBlock)]
    assert all(b.temb.in_features == 32 and b.film.in_features == 32 for b in blocks)
    assert all(b.film.out_features == 2 * b.conv2.out_channels for b in blocks)
    plain = UNet(UNetConfig(**CFG))
    assert not hasattr(plain, "label_emb") and all(b.film is None for b in plain.modules() if isinstance(b, ResBlock))
    x = torch.randn(2, 1, 8, 8)
    assert net(x, labels=torch.tensor([0, 4])).shape == x.shape
    timed = UNet(UNetConfig(**CFG, time_input=True, num_classes=5))
    assert timed(x, 2, labels=torch.tensor([1, 3])).shape == x.shape


def test_save_load_round_trip_is_exact(tmp_path):
    model = lively(cond_micro(num_classes=4, alpha=0.3, steps=2))
    path = tmp_path / "c.safetensors"
    model.save(path)
    loaded = dkgm_aug.load(path)
    assert loaded.config() == model.config() and loaded.num_classes == 4 and loaded.conditional
    assert loaded.config()["stage1"]["num_classes"] == loaded.config()["stage2"]["num_classes"] == 4
    x, y = images(), torch.tensor([0, 3, 1, 2])
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert torch.equal(model.sample(x, eps=eps_like(x), labels=y), loaded.sample(x, eps=eps_like(x), labels=y))
    assert torch.equal(model.neighbours_from_seeds(x, [1, 2, 3, 4], labels=y),
                       loaded.neighbours_from_seeds(x, [1, 2, 3, 4], labels=y))


def test_unconditional_configs_read_as_before():
    old = dict(CFG, channel_mult=[1, 2], attn_levels=[1], mid_attention=True, dropout=0.0, time_input=False)
    assert UNetConfig.from_dict(old).num_classes == 0             # a config from before num_classes
    cfg = micro_model().config()
    assert "num_classes" not in cfg["stage1"] and "num_classes" not in cfg["stage2"]   # bytes unchanged
    assert not DKGM.from_config(cfg).conditional
    shipped = dkgm_aug.load("digits-tiny")
    assert shipped.num_classes == 0 and not shipped.conditional


def test_with_labels_keeps_the_function_and_the_original():
    torch.manual_seed(0)
    base = lively(micro_model(image_size=8, steps=3))
    base.info["training"] = {"seed": 0}
    before = copy.deepcopy(base.state_dict())
    x = images()
    eps = eps_like(x)
    want = base.sample(x, eps=eps)
    for stages in ((1,), (2,), (1, 2)):
        cond = base.with_labels(5, stages=stages)
        assert cond is not base and cond.conditional and cond.num_classes == 5
        assert [cond._classes[s] for s in (1, 2)] == [5 if s in stages else 0 for s in (1, 2)]
        assert (cond.alpha, cond.steps, cond.kernel) == (base.alpha, base.steps, base.kernel)
        assert cond.info["training"] == {"seed": 0} and cond.info["conditional_from"]["stages"] == list(stages)
        for labels in ([0, 0, 0, 0], [4, 4, 4, 4], [1, 2, 3, 0]):
            assert torch.equal(cond.sample(x, eps=eps, labels=labels), want), (stages, labels)
    assert not base.conditional and "conditional_from" not in base.info
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    assert torch.equal(base.sample(x, eps=eps), want)


def test_with_labels_learns_the_label():
    """One optimizer step on each stage makes the warm-started model depend on the label."""
    torch.manual_seed(0)
    cond = lively(micro_model(image_size=8)).with_labels(3, stages=(1, 2)).train()
    x = images(6, seed=3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for stage in (1, 2):
        opt = torch.optim.Adam(cond.stage_module(stage).parameters(), lr=1e-2)
        for step in range(2):   # stage 2: the scale-shift learns first, then the (zero) label embedding
            opt.zero_grad()
            cond(x, stage=stage, generator=torch.Generator().manual_seed(step), labels=y).backward()
            opt.step()
    cond.eval()
    assert cond.stage2.label_emb.weight.abs().min() > 0
    eps = eps_like(x[:2])
    a, b = (cond.sample(x[:2], eps=eps, labels=[c, c], return_stages=True) for c in (0, 1))
    assert (a[0] - b[0]).abs().max() > 1e-3 and (a[1] - b[1]).abs().max() > 1e-3     # stage 1 and the output
    _, a = a
    assert torch.equal(a, cond.sample(x[:2], eps=eps, labels=torch.tensor([0, 0])))


def test_output_depends_on_label_and_is_deterministic():
    model = lively(cond_micro())
    x = images()
    g = lambda: torch.Generator().manual_seed(0)
    a = model.sample(x, generator=g(), labels=[0, 0, 0, 0])
    assert torch.equal(a, model.sample(x, generator=g(), labels=[0, 0, 0, 0]))
    assert not torch.equal(a, model.sample(x, generator=g(), labels=[2, 2, 2, 2]))
    kde1, _ = model.sample(x, generator=g(), labels=[0, 0, 0, 0], return_stages=True)
    kde2, _ = model.sample(x, generator=g(), labels=[1, 1, 1, 1], return_stages=True)
    assert (kde1 - kde2).abs().max() > 1e-3                         # stage 1 is conditional too
    one, two = (model.debias(x, labels=[c] * 4) for c in (0, 1))
    assert (one - two).abs().max() > 1e-3                           # and so is stage 2
    rows = model.preview(x, 2, generator=g(), labels=[0, 1, 2, 0])
    assert len(rows) == 5 and torch.equal(rows[2], model.sample(x, generator=g(), labels=[0, 1, 2, 0]))


@pytest.mark.parametrize("labels", [
    [0, 2, 1], (0, 2, 1), [np.int64(0), np.int32(2), np.uint8(1)], [torch.tensor(0), torch.tensor(2), torch.tensor(1)],
    torch.tensor([0, 2, 1], dtype=torch.int32), np.array([0, 2, 1])])
def test_label_kinds(labels):
    model = lively(cond_micro())
    x = images(3)
    want = model.sample(x, eps=eps_like(x), labels=torch.tensor([0, 2, 1]))
    assert torch.equal(model.sample(x, eps=eps_like(x), labels=labels), want)


def test_neighbours_repeat_labels_and_seeds_split_invariant():
    model = lively(cond_micro())
    x, y = images(), torch.tensor([0, 1, 2, 1])
    out = model.neighbours(x, k=3, labels=y, generator=torch.Generator().manual_seed(0))
    direct = model.sample(x.repeat_interleave(3, 0), labels=y.repeat_interleave(3),
                          generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 1, 8, 8) and torch.equal(out.flatten(0, 1), direct)
    other = model.neighbours(x, k=3, labels=[2, 2, 2, 2], generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out[0], other[0])
    m64, x64, seeds, labels = copy.deepcopy(model).double(), x.double(), [5, 6, 7, 8], [0, 1, 2, 1]
    whole = m64.neighbours_from_seeds(x64, seeds, labels=labels)
    parts = torch.cat([m64.neighbours_from_seeds(x64[i:i + 2], seeds[i:i + 2], labels=labels[i:i + 2])
                       for i in (0, 2)])
    alone = torch.cat([m64.neighbours_from_seeds(x64[i:i + 1], seeds[i:i + 1], labels=labels[i:i + 1])
                       for i in range(4)])
    assert torch.allclose(parts, whole, rtol=0, atol=1e-12) and torch.allclose(alone, whole, rtol=0, atol=1e-12)
    assert not torch.allclose(whole, m64.neighbours_from_seeds(x64, seeds, labels=[2, 2, 0, 0]), atol=1e-3)


def test_unconditional_dkgm_ignores_labels(micro):
    lively(micro)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    a = micro.neighbours_from_seeds(x, [1, 2], labels=["shirt", None])
    assert torch.equal(a, micro.neighbours_from_seeds(x, [1, 2]))


# -- clear errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("labels, match", [
    (None, r"class-conditional \(3 classes\): give each image's class index, labels=\.\.\."),
    ([0, 1], "2 labels for 3 images"),
    (torch.tensor([0, 1, 2, 0]), "4 labels for 3 images"),
    (torch.tensor([0.0, 1.0, 2.0]), "integer"),
    ([0, 1.0, 2], "integer"),
    ([0, True, 2], "integer"),
    (["a", "b", "c"], "integer"),
    (torch.tensor([True, False, True]), "integer"),
    (torch.zeros(3, 1, dtype=torch.long), "1-D"),
    ([0, 1, 3], r"\[0, 3\)"),
    (torch.tensor([-1, 0, 1]), r"\[0, 3\)"),
    ("012", "list of class indices"),
])
def test_bad_labels(labels, match):
    model = cond_micro()
    x = images(3)
    for call in (lambda: model.sample(x, labels=labels), lambda: model(x, stage=1, labels=labels),
                 lambda: model.neighbours_from_seeds(x, [1, 2, 3], labels=labels),
                 lambda: model.neighbours(x, 2, labels=labels), lambda: model.debias(x, labels=labels)):
        with pytest.raises(DataError, match=match):
            call()


def test_unet_label_errors():
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(DKGMError, match="unconditional"):
        UNet(UNetConfig(**CFG))(x, labels=torch.tensor([0, 1]))
    with pytest.raises(DKGMError, match="unconditional"):
        UNet(UNetConfig(**CFG, time_input=True))(x, 1, labels=torch.tensor([0, 1]))
    cond = UNet(UNetConfig(**CFG, num_classes=3))
    with pytest.raises(DKGMError, match=r"class-conditional \(3 classes\)"):
        cond(x)
    with pytest.raises(DKGMError, match="integer tensor"):
        cond(x, labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(DKGMError, match="class-conditional already"):
        cond.with_labels(3)


@pytest.mark.parametrize("value", [-1, 100_001, True, 2.0, "3", None])
def test_bad_num_classes(value):
    with pytest.raises(DKGMError, match="num_classes"):
        UNetConfig(num_classes=value)
    with pytest.raises(DKGMError, match="num_classes"):
        DKGM.from_preset("tiny", image_size=8, num_classes=value)


@pytest.mark.parametrize("stages", [(3,), (0, 1), (1, 1), (True,), "12", 1])
def test_bad_conditional_stages(stages):
    with pytest.raises(DKGMError, match="conditional stages"):
        DKGM.from_preset("tiny", image_size=8, num_classes=3, conditional_stages=stages)
    with pytest.raises(DKGMError, match="conditional stages"):
        micro_model(image_size=8).with_labels(3, stages=stages)


def test_bad_conditional_construction():
    with pytest.raises(DKGMError, match="at least one conditional stage"):
        DKGM.from_preset("tiny", image_size=8, num_classes=3, conditional_stages=())
    with pytest.raises(DKGMError, match="same num_classes"):
        DKGM(UNetConfig(**CFG, num_classes=3), UNetConfig(**CFG, time_input=True, num_classes=4), image_size=8)
    with pytest.raises(DKGMError, match="num_classes"):
        micro_model(image_size=8).with_labels(0)
    with pytest.raises(DKGMError, match="class-conditional already"):
        cond_micro(stages=(1,)).with_labels(3, stages=(1,))
    with pytest.raises(DKGMError, match="same num_classes"):
        cond_micro(stages=(1,)).with_labels(4, stages=(2,))
    assert cond_micro(stages=(1,)).with_labels(3, stages=(2,)).num_classes == 3


# -- the Trainer ---------------------------------------------------------------------------------
def labelled(n=12, size=16, seed=0, labels=None):
    x = (shapes_batch(n, size=size, seed=seed) * 255).round().to(torch.uint8)
    y = torch.arange(n) % 3 if labels is None else labels
    return torch.utils.data.TensorDataset(x, y)


def test_trainer_trains_a_conditional_dkgm_and_it_reloads(tmp_path):
    torch.manual_seed(0)
    model = DKGM.from_preset("tiny", image_size=16, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = labelled()
    t = Trainer(model, data, out_dir=tmp_path, batch_size=4, max_steps=3, progress=False)
    t.fit(1)    # 3 steps: the output conv, then the residual convs, then the label path learn (zero-initialised)
    t.fit(2)
    assert not torch.equal(before["stage1.label_emb.weight"], model.stage1.label_emb.weight)
    assert not torch.equal(before["stage2.label_emb.weight"], model.stage2.label_emb.weight)
    assert (tmp_path / "samples_stage2_step3.png").exists()
    loaded = dkgm_aug.load(tmp_path / "model.safetensors")
    assert loaded.conditional and loaded.num_classes == 3
    x = images(3, size=16)
    model.cpu().eval()
    assert torch.equal(loaded.sample(x, eps=eps_like(x), labels=[0, 1, 2]),
                       model.sample(x, eps=eps_like(x), labels=[0, 1, 2]))
    # a resume on the same images with other labels would mix two runs
    with pytest.raises(DKGMError, match="--data"):
        Trainer(model, labelled(labels=torch.arange(12) % 2), out_dir=tmp_path, batch_size=4, max_steps=5,
                progress=False).fit(1)


def test_trainer_takes_pairs_from_datasets_and_loaders(tmp_path):
    data = labelled(8, size=8)
    for i, d in enumerate([data, torch.utils.data.DataLoader(data, batch_size=4)]):
        model = cond_micro()
        t = Trainer(model, d, out_dir=None, batch_size=4, max_steps=2, progress=False)
        t.fit(1)
        assert len(t.losses) == 2 and all(v > 0 for v in t.losses)


@pytest.mark.parametrize("make, match", [
    (lambda: shapes_batch(8, size=8), "bare image tensor"),
    (lambda: torch.utils.data.DataLoader(shapes_batch(8, size=8), batch_size=4), "batches of type Tensor"),
    (lambda: torch.utils.data.Subset(shapes_batch(8, size=8), range(8)), "items of type Tensor"),
    (lambda: torch.utils.data.TensorDataset(shapes_batch(8, size=8), torch.rand(8)), "integer class indices"),
])
def test_trainer_refuses_data_without_labels(make, match):
    with pytest.raises(DataError, match=match) as err:
        Trainer(cond_micro(), make(), out_dir=None, batch_size=4, max_steps=1, progress=False).fit(1)
    assert "class-conditional" in str(err.value) or "integer" in match


def test_trainer_refuses_out_of_range_labels():
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        Trainer(cond_micro(), labelled(8, size=8, labels=torch.arange(8)), out_dir=None, batch_size=8,
                max_steps=1, progress=False).fit(1)


def test_fingerprint_covers_labels_only_for_conditional_models():
    a, b = labelled(8, size=8), labelled(8, size=8, labels=torch.arange(8) % 2)
    assert data_fingerprint(a) == data_fingerprint(b)
    assert data_fingerprint(a, labels=True) != data_fingerprint(b, labels=True)
    x = (shapes_batch(8, size=8) * 255).round().to(torch.uint8)    # the unconditional hash is unchanged
    h = hashlib.sha256(f"{tuple(x.shape)} {x.dtype}".encode())
    h.update(x.flatten().numpy())
    assert data_fingerprint(x) == h.hexdigest()[:16]


# -- DKGMAugment -----------------------------------------------------------------------------------
def test_augment_takes_the_label_from_the_sample(cond_ckpt):
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    out, y_out = DKGMAugment(cond_ckpt, seed=0)(x, y)
    assert y_out is y and out.shape == x.shape and not torch.equal(out, x)
    again, _ = DKGMAugment(cond_ckpt, seed=0)(x, torch.tensor([0, 1, 2, 1]))
    other, _ = DKGMAugment(cond_ckpt, seed=0)(x, torch.tensor([2, 2, 0, 0]))
    assert torch.equal(out, again) and not torch.equal(out, other)
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8))
    img, label = DKGMAugment(cond_ckpt, seed=0)(pil, 2)
    assert isinstance(img, Image.Image) and img.size == (8, 8) and label == 2
    img, label = v2.Compose([DKGMAugment(cond_ckpt, seed=0)])(tv_tensors.Image(torch.rand(1, 8, 8)), torch.tensor(1))
    assert isinstance(img, tv_tensors.Image) and int(label) == 1
    sample = DKGMAugment(cond_ckpt, seed=0)({"image": pil, "label": np.int64(1)})
    assert set(sample) == {"image", "label"} and sample["label"] == 1


def test_augment_takes_a_dict_samples_class_from_its_label_key_never_from_another_number(cond_ckpt):
    """In a dict sample the class is the value under 'label' (or 'target', 'y'...) wherever that key
    sits; an index or id field beside it is not the class (the first number used to be taken), and a
    dict without a label key is refused by a conditional generator, passed through by others."""
    img = tv_tensors.Image(torch.rand(1, 8, 8))
    aug = lambda sample, ckpt=cond_ckpt: DKGMAugment(ckpt, seed=0)(sample)
    with_index = aug({"image": img, "index": 2, "label": 1})
    assert torch.equal(with_index["image"], aug({"image": img, "label": 1})["image"])
    assert not torch.equal(with_index["image"], aug({"image": img, "label": 2})["image"])
    assert torch.equal(aug({"image": img, "id": 0, "target": 1})["image"], with_index["image"])
    for sample in ({"image": img, "index": 2}, {"image": img, "label": 1, "y": 2}):
        with pytest.raises(DataError, match="under the key 'label'"):
            aug(sample)
    unconditional = micro_model()
    out = DKGMAugment(unconditional, seed=0)({"image": img, "index": 2, "id": 3})
    assert out["index"] == 2 and out["image"].shape == img.shape


def test_augment_refuses_a_tuple_sample_with_an_index_beside_the_label(cond_ckpt):
    """(img, index, label) used to give the index to a conditional generator as the class (the first
    number of a tuple was taken): with more than one number beside the image, which one is the class
    is unknown, so a generator that uses labels refuses; others pass the sample through."""
    img = tv_tensors.Image(torch.rand(1, 8, 8))
    for sample in ((img, 2, 1), (img, torch.tensor(0), torch.tensor(1)), [img, 1, 0.5]):
        with pytest.raises(DataError, match="more than one number"):
            DKGMAugment(cond_ckpt, seed=0)(*sample)
    out = DKGMAugment(micro_model(), seed=0)(img, 2, 1)
    assert out[1:] == (2, 1) and out[0].shape == img.shape
    alone, _ = DKGMAugment(cond_ckpt, seed=0)(img, 1)                # (img, label) still works
    for extra in ("cat/001.png", {"path": "a.png"}):                   # a path beside the label is no class
        out = DKGMAugment(cond_ckpt, seed=0)(img, 1, extra)
        assert torch.equal(out[0], alone) and out[2] == extra
    nested = DKGMAugment(cond_ckpt, seed=0)(img, {"index": 2, "label": 1})
    assert torch.equal(nested[0], alone)


def test_per_class_kernel_smoothed_score_gets_the_samples_label():
    """A KernelSmoothedScore built with labels draws from the labelled class in DKGMAugment (it used
    to draw from the whole set, labels dropped); the albumentations twin, which has no labels, refuses it."""
    dark, bright = torch.full((4, 1, 8, 8), 30, dtype=torch.uint8), torch.full((4, 1, 8, 8), 220, dtype=torch.uint8)
    kss = dkgm_aug.KernelSmoothedScore(torch.cat([dark, bright]), labels=[0] * 4 + [1] * 4, h=0.05, steps=10,
                                       alpha=1.0)
    grey = torch.full((2, 1, 8, 8), 0.5)
    out, _ = DKGMAugment(kss, seed=0)(grey, torch.tensor([1, 0]))
    assert out[0].mean() > 0.7 and out[1].mean() < 0.3
    with pytest.raises(DataError, match="per-class"):
        dalb.DKGMAugment(kss, p=1.0)(image=np.full((8, 8), 0.5, np.float32))
    named = dkgm_aug.KernelSmoothedScore(torch.cat([dark, bright]), labels=["dark"] * 4 + ["bright"] * 4, h=0.05,
                                         steps=10, alpha=1.0)         # string classes reach it too
    assert DKGMAugment(named, seed=0)(grey[0], "bright")[0].mean() > 0.7
    assert DKGMAugment(named, seed=0)({"image": grey[0], "label": "dark"})["image"].mean() < 0.3


def test_augment_label_matches_the_model(cond_ckpt):
    """The label reaches the generator: the same neighbour as the model gives with that label."""
    from dkgm_aug.augment import generate
    model = dkgm_aug.load(cond_ckpt)
    x, y = torch.rand(3, 1, 8, 8), [2, 0, 1]
    t = DKGMAugment(cond_ckpt, seed=4)
    params = t.make_params([x])
    params["labels"] = torch.tensor(y)
    assert torch.equal(t.transform(x, params), generate(model, x, params["seeds"], labels=y))


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_augment_errors_without_or_with_bad_labels(cond_ckpt, p):
    t = DKGMAugment(cond_ckpt, p=p, seed=0)
    with pytest.raises(DataError, match=r"class-conditional \(3 classes\).*aug\(img, label\)"):
        t(torch.rand(2, 1, 8, 8))
    with pytest.raises(DataError, match="2 labels for 3 images"):
        t(torch.rand(3, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        t(torch.rand(1, 8, 8), 7)
    with pytest.raises(DataError, match="integer"):
        t(torch.rand(1, 8, 8), 1.5)


def test_unconditional_augment_passes_labels_through():
    torch.manual_seed(0)
    model = lively(micro_model(image_size=8))
    calls = []
    original = model.neighbours_from_seeds
    model.neighbours_from_seeds = lambda *a, **kw: calls.append(kw["labels"]) or original(*a, **kw)
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    out, y_out = DKGMAugment(model, seed=0)(x, y)
    assert y_out is y and torch.equal(out, DKGMAugment(model, seed=0)(x)) and calls == [None, None]


def test_albumentations_twin_refuses_a_conditional_generator(cond_ckpt):
    import albumentations as A
    with pytest.raises(DataError, match="class-conditional.*DKGMAugment.*BalancedDKGMDataset"):
        A.Compose([dalb.DKGMAugment(cond_ckpt, p=1.0)])(image=np.zeros((8, 8), np.uint8))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), h=st.integers(1, 12), w=st.integers(1, 12), uint8=st.booleans(),
       p=st.floats(0, 1), seed=st.integers(0, 2 ** 31), batched=st.booleans(), data=st.data())
def test_property_conditional_augment(cond_ckpt, b, h, w, uint8, p, seed, batched, data):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 1, h, w) if batched else (1, h, w)
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if uint8 else torch.rand(shape, generator=g)
    n = b if batched else 1
    labels = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    y = torch.tensor(labels) if batched else labels[0]
    x0 = x.clone()
    out, y_out = DKGMAugment(cond_ckpt, p=p, seed=seed)(x, y)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(x, x0) and y_out is y
    if not uint8:
        assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, DKGMAugment(cond_ckpt, p=p, seed=seed)(x, y)[0])


# -- the CLI -----------------------------------------------------------------------------------
TRAIN = ["train", "--data", "digits", "--limit", "64", "--preset", "tiny", "--stage1-steps", "2",
         "--stage2-steps", "1", "--batch-size", "16", "--quiet"]


def test_cli_trains_a_conditional_dkgm(tmp_path, capsys):
    out = tmp_path / "cond.safetensors"
    assert main(TRAIN + ["--conditional", "--work-dir", str(tmp_path / "run"), "--out", str(out)]) == 0
    model = dkgm_aug.load(out)
    assert model.conditional and model.num_classes == 10
    assert model.config()["stage1"]["num_classes"] == model.config()["stage2"]["num_classes"] == 10
    assert main(["sample", str(out), "--n", "3", "--k", "2", "--out", str(tmp_path / "s.png")]) == 0
    one = tmp_path / "one.safetensors"
    assert main(TRAIN + ["--conditional", "--conditional-stages", "2", "--work-dir", str(tmp_path / "run2"),
                         "--out", str(one)]) == 0
    cfg = dkgm_aug.load(one).config()
    assert "num_classes" not in cfg["stage1"] and cfg["stage2"]["num_classes"] == 10
    capsys.readouterr()
    assert main(TRAIN + ["--conditional-stages", "1", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--conditional-stages needs --conditional" in capsys.readouterr().err
    assert main(["train", "--kind", "evae", "--data", "digits", "--limit", "16", "--conditional",
                 "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "--kind evae" in capsys.readouterr().err


def test_a_dataset_with_the_classes_in_another_order_is_refused_by_a_conditional_generator(tmp_path):
    """A conditional generator trained on classes ['cat', 'dog', 'eel'] given an image folder that
    names them in another order conditioned each image on another class (index 0 is 'cat' to the
    generator, 'dog' here), with no error; names the generator does not know ('0', '1', 'fox') pass."""
    from dkgm_aug.data import ImageDataset
    model = micro_model(image_size=8).with_labels(3, stages=(1,))
    model.info["classes"] = ["cat", "dog", "eel"]
    images = (torch.rand(9, 1, 8, 8) * 255).to(torch.uint8)
    targets = torch.tensor([0] * 5 + [1] * 3 + [2])
    swapped = ImageDataset(images, targets, ["dog", "cat", "eel"])
    with pytest.raises(DataError, match="'dog' is index 1 to the generator but 0 here"):
        dkgm_aug.BalancedDKGMDataset(swapped, model, progress=False)[-1]
    with pytest.raises(DataError, match="trained with classes"):
        dkgm_aug.NeighbourBank(swapped, model, k=1).build(progress=False)
    remapped = [{"dog": 1, "cat": 0, "eel": 2}[swapped.classes[int(t)]] for t in targets]   # labels= in its order
    ds = dkgm_aug.BalancedDKGMDataset(swapped, model, progress=False, labels=remapped)
    assert ds[-1][0].shape == (1, 8, 8)
    assert dkgm_aug.NeighbourBank(swapped, model, k=1, labels=remapped).build(progress=False).built
    for names in (["cat", "dog", "eel"], ["0", "1", "2"], ["cat", "dog", "fox"]):
        ds = dkgm_aug.BalancedDKGMDataset(ImageDataset(images, targets, names), model, progress=False)
        assert ds[len(ds) - 1][0].shape == (1, 8, 8)


def test_numbered_classes_in_string_order_are_refused_by_a_generator_trained_on_integer_labels():
    """Index-looking names ('0', '1', ...) on either side skipped the class-order check: a generator
    trained on integer labels 0..10 (classes '0' .. '10') given an image folder of the same classes,
    whose sorted folder names put '10' at index 2, conditioned every class from 2 on another one."""
    from dkgm_aug.data import ImageDataset
    model = micro_model(image_size=8).with_labels(11, stages=(1,))
    model.info["classes"] = [str(i) for i in range(11)]
    folder_order = sorted(str(i) for i in range(11))        # '0', '1', '10', '2', ...
    images = (torch.rand(21, 1, 8, 8) * 255).to(torch.uint8)
    targets = torch.arange(21) % 11                            # class 10 has one item: one synthetic item
    with pytest.raises(DataError, match="class '10' is index 10 to the generator but 2 here"):
        dkgm_aug.BalancedDKGMDataset(ImageDataset(images, targets, folder_order), model, progress=False)[-1]
    ds = dkgm_aug.BalancedDKGMDataset(ImageDataset(images, targets, [str(i) for i in range(11)]), model, progress=False)
    assert ds[len(ds) - 1][0].shape == (1, 8, 8)


def test_dkgm_augment_refuses_class_names_in_another_order_than_the_conditional_generators():
    """DKGMAugment(img, label) with a conditional generator had no class-order check: labels of an
    image folder sorted as ['dog', 'cat', 'eel'] were taken as the generator's ['cat', 'dog', 'eel']
    indices. classes= (the data's names in label order) lets it refuse; the right order passes."""
    from dkgm_aug import DKGMAugment
    model = micro_model(image_size=8).with_labels(3, stages=(1,))
    model.info["classes"] = ["cat", "dog", "eel"]
    img = torch.rand(1, 8, 8)
    with pytest.raises(DataError, match="'dog' is index 1 to the generator but 0 here"):
        DKGMAugment(model, seed=0, classes=["dog", "cat", "eel"])(img, 1)
    out, label = DKGMAugment(model, seed=0, classes=["cat", "dog", "eel"])(img, 1)
    assert out.shape == img.shape and label == 1
    assert torch.equal(out, DKGMAugment(model, seed=0)(img, 1)[0])      # the check changes nothing else
    with pytest.raises(DKGMError, match="classes must be a list"):
        DKGMAugment(model, classes="cat,dog,eel")
