"""EVAE and the Gaussian VAE baseline (dkgm_aug.vae), the feature net, the Frechet distance,
and the EVAE-vs-VAE benchmark's --quick mode."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import dkgm_aug
from dkgm_aug import BalancedDKGMDataset, CheckpointError, DataError, DKGMError
from dkgm_aug.checkpoint import METADATA_KEY, model_kinds
from dkgm_aug.data import FASHION_MNIST_DIR, ImageDataset
from dkgm_aug.features import (FeatureNet, features, load_feature_net, save_feature_net,
                               train_feature_net)
from dkgm_aug.metrics import frechet_distance
from dkgm_aug.vae import B_M, EVAE, VAE, fit, from32, to32
from conftest import load_benchmark, shapes_batch

TINY = dict(channels=1, image_size=8, d_z=3, widths=(4, 4, 8, 8))


def tiny(cls=EVAE, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**{**TINY, **kw})


def images_uint8(n, size=8, seed=0):
    return (shapes_batch(n, size=max(size, 8), seed=seed)[..., :size, :size] * 255).round().to(torch.uint8)


# -- the EVAE loss and latent sampler ------------------------------------------------------------
def test_b_m_is_the_papers_step_size():
    assert B_M == pytest.approx(100 ** (-2 / 9)) and B_M == pytest.approx(0.3594, abs=1e-4)
    assert tiny().b_m == B_M


def test_evae_loss_equals_hand_computation(monkeypatch):
    model = tiny(B=0.5, M=7)
    x01 = torch.tensor([[0.0, 0.25, 1.0, 0.5], [1.0, 0.0, 0.75, 0.1]]).view(2, 1, 2, 2)
    mu = torch.tensor([[0.3, -1.2, 2.0], [0.0, 0.5, -0.4]])
    r = torch.tensor([[0.5, 1.5, 0.1], [2.0, 0.25, 1.0]])
    w = torch.tensor([0.7, -0.2, 1.3])
    monkeypatch.setattr(model, "encode", lambda x: (mu, r))
    # logits depend on z, so the test also sees the sampled latent
    monkeypatch.setattr(model, "decode_logits",
                        lambda z, size=None: (z @ w)[:, None, None, None] + torch.tensor([[-1.0, 0.5], [2.0, 0.0]]))
    loss = model.loss(x01, generator=torch.Generator().manual_seed(3))

    noise = model.draw_noise(2, torch.Generator().manual_seed(3))          # the same draws
    k, v = noise[:, 0], noise[:, 1]
    z = B_M * (mu + r * k) + 0.5 * v                                        # U = B v, v ~ U[-1/2, 1/2]
    p = torch.sigmoid((z @ w)[:, None, None, None] + torch.tensor([[-1.0, 0.5], [2.0, 0.0]]))
    bce = -(x01 * p.log() + (1 - x01) * (1 - p).log()).flatten(1).sum(1)   # summed over pixels
    penalty = 3 * 0.5 / (5 * 7) * (1 / r).sum(1)                           # 3B / (5M) sum_k 1/r_k
    assert float(loss) == pytest.approx(float((bce + penalty).mean()), rel=1e-6)
    rec, reg = model.loss_terms(x01, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(reg, penalty) and torch.allclose(rec, bce, rtol=1e-5)


def test_vae_loss_equals_hand_computation(monkeypatch):
    model = tiny(VAE)
    x01 = torch.tensor([[0.2, 0.9], [0.0, 1.0]]).view(2, 1, 1, 2)
    mu, logvar = torch.tensor([[0.3, -1.0, 0.5], [1.0, 0.0, -2.0]]), torch.tensor([[0.1, -0.5, 0.0], [0.3, 1.0, -1.0]])
    monkeypatch.setattr(model, "encode", lambda x: (mu, logvar))
    monkeypatch.setattr(model, "decode_logits", lambda z, size=None: z[:, :2].reshape(2, 1, 1, 2))
    loss = model.loss(x01, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(1))[:, 0]
    z = mu + torch.exp(logvar / 2) * eps
    bce = F.binary_cross_entropy(torch.sigmoid(z[:, :2]).view(2, 1, 1, 2), x01, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
    assert float(loss) == pytest.approx(float((bce + kl).mean()), rel=1e-6)


def test_latent_sampler_moments_and_support():
    model = tiny(B=0.4, d_z=4)
    n = 200_000
    mu = torch.tensor([0.5, -2.0, 0.0, 3.0]).expand(n, 4)
    r = torch.tensor([1.0, 0.2, 3.0, 0.05]).expand(n, 4)
    z = model.sample_latent(mu, r, generator=torch.Generator().manual_seed(0)).double()
    mean, var = z.mean(0), z.var(0)
    want_mean = B_M * mu[0].double()
    want_var = B_M ** 2 * r[0].double() ** 2 / 5 + 0.4 ** 2 / 12
    se_mean = (var / n).sqrt()
    se_var = (((z - mean) ** 4).mean(0) - var ** 2).div(n).sqrt()
    assert ((mean - want_mean).abs() < 5 * se_mean).all(), (mean, want_mean)
    assert ((var - want_var).abs() < 5 * se_var).all(), (var, want_var)
    # compact support: |z - b_m mu| <= b_m r + B/2, and the bound is nearly reached
    dev, bound = (z - B_M * mu[0]).abs(), B_M * r[0].double() + 0.2
    assert (dev <= bound + 1e-6).all()
    assert (dev.max(0).values > 0.95 * bound).all()


def test_alpha_scales_the_latent_noise():
    model = tiny(B=0.4)
    mu, r = torch.randn(5, 3), torch.rand(5, 3) + 0.1
    noise = model.draw_noise(5, torch.Generator().manual_seed(0))
    z0, z1, z2 = (model.sample_latent(mu, r, noise=noise, alpha=a) for a in (0.0, 1.0, 2.0))
    assert torch.allclose(z0, B_M * mu) and torch.allclose(z2 - z0, 2 * (z1 - z0), atol=1e-6)


# -- the generator interface ---------------------------------------------------------------------
@pytest.mark.parametrize("cls", [EVAE, VAE])
@pytest.mark.parametrize("size", [8, 28, (5, 9), 40])
def test_neighbours_shapes_range_and_geometry(cls, size):
    model = tiny(cls, image_size=size)
    hw = model.image_size
    x = torch.rand(3, 1, *hw) * 2 - 1
    out = model.neighbours(x, k=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 2, 1, *hw) and out.min() >= -1 and out.max() <= 1
    one = model.neighbours_from_seeds(x, [1, 2, 3])
    assert one.shape == x.shape and one.min() >= -1 and one.max() <= 1
    assert to32(x).shape[-2:] == (32, 32) and from32(to32(x), hw).shape == x.shape
    if max(hw) <= 32:
        assert torch.equal(from32(to32(x), hw), x)   # padding is undone exactly


@pytest.mark.parametrize("cls", [EVAE, VAE])
def test_same_seeds_same_outputs_batch_independent(cls):
    model = tiny(cls, widths=(8, 8, 16, 16))
    fit(model, images_uint8(40), epochs=2, batch_size=10, lr=3e-3, progress=False)
    model.train()   # generation must still use the running statistics
    x = shapes_batch(4, size=8) * 2 - 1
    a = model.neighbours_from_seeds(x, [5, 6, 7, 8])
    assert torch.equal(a, model.neighbours_from_seeds(x, [5, 6, 7, 8]))
    assert not torch.equal(a, model.neighbours_from_seeds(x, [9, 6, 7, 8]))
    assert torch.allclose(a[2:3], model.neighbours_from_seeds(x[2:3], [7]), atol=1e-6)
    assert model.training   # mode restored
    g = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(model.neighbours(x, 2, generator=g()), model.neighbours(x, 2, generator=g()))
    # alpha=0: the posterior-mean reconstruction
    mean_rec = model.reconstruct((x + 1) / 2) * 2 - 1
    assert torch.allclose(model.neighbours_from_seeds(x, [1, 2, 3, 4], alpha=0.0), mean_rec, atol=1e-6)


def test_forward_is_the_loss_and_bad_inputs_raise():
    model = tiny()
    x01 = shapes_batch(4, size=8)
    g = lambda: torch.Generator().manual_seed(0)
    with torch.no_grad():
        assert float(model(x01 * 2 - 1, generator=g())) == pytest.approx(float(model.loss(x01, generator=g())), rel=1e-5)
    with pytest.raises(DKGMError):
        model(x01, stage=2)
    with pytest.raises(DataError):
        model.loss(x01 * 2 - 1)   # BCE targets must be in [0, 1]
    with pytest.raises(DKGMError):
        model.neighbours(x01, k=0)
    with pytest.raises(DKGMError):
        model.neighbours_from_seeds(x01, [1, 2])
    with pytest.raises(DataError):
        model.neighbours(torch.rand(2, 3, 8, 8))   # 3 channels, the model takes 1


def test_fit_trains_and_records(tmp_path):
    model = tiny(seed=1)
    data = images_uint8(40)
    hist = fit(model, data, epochs=3, batch_size=10, lr=3e-3, seed=0, progress=False)
    assert len(hist) == 3 and hist[-1] < hist[0]
    assert model.M == 40 and model.info["training"]["n_images"] == 40 and not model.training
    with pytest.raises(DataError):
        fit(model, data.float(), epochs=1, progress=False)


def test_fit_is_the_trainer_with_ema_and_leaves_torch_rng_alone():
    data = images_uint8(40)
    rng = torch.get_rng_state()
    ema, last = tiny(seed=1), tiny(seed=1)
    hist = fit(ema, data, epochs=2, batch_size=10, lr=3e-3, progress=False, max_batches=3)
    assert torch.equal(torch.get_rng_state(), rng)            # the trainer's seeding stays inside fit
    assert fit(last, data, epochs=2, batch_size=10, lr=3e-3, progress=False, max_batches=3, ema_decay=0.0) == hist
    assert ema.info["training"]["batches_per_epoch"] == 3 and ema.info["training"]["ema_decay"] == 0.999
    assert any(not torch.equal(v, last.state_dict()[k]) for k, v in ema.state_dict().items())   # EMA weights
    assert fit(tiny(), data, epochs=0, progress=False) == []


# -- checkpoints ---------------------------------------------------------------------------------
def test_kinds_registered_and_meta_constructible():
    kinds = model_kinds()
    assert kinds["evae"] is EVAE and kinds["vae"] is VAE
    for cls in (EVAE, VAE):
        with torch.device("meta"):
            m = cls.from_config(cls().config())
        assert next(m.parameters()).is_meta


@pytest.mark.parametrize("cls", [EVAE, VAE])
def test_save_load_round_trip_exact(cls, tmp_path):
    model = tiny(cls)
    fit(model, images_uint8(20), epochs=1, batch_size=10, progress=False)
    path = tmp_path / f"{cls.kind}.safetensors"
    model.save(path, classes=["a", "b"])
    loaded = dkgm_aug.load(path)
    assert type(loaded) is cls and loaded.config() == model.config() and loaded.info["classes"] == ["a", "b"]
    state = loaded.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = shapes_batch(3, size=8) * 2 - 1
    assert torch.equal(model.neighbours_from_seeds(x, [1, 2, 3]), loaded.neighbours_from_seeds(x, [1, 2, 3]))


@pytest.mark.parametrize("bad", [dict(d_z=0), dict(B=-1.0), dict(B=float("nan")), dict(M=0), dict(M=1.5),
                                 dict(widths=[4, 4, 8]), dict(image_size=[8, 0]), dict(channels=True),
                                 dict(alpha=-1.0), dict(info=[1]), dict(unknown=1)])
def test_bad_config_raises(bad):
    with pytest.raises(DKGMError):
        EVAE.from_config({**tiny().config(), **bad})
    with pytest.raises(DKGMError):
        EVAE.from_config("not a dict")


def _rewrite_config(src, dst, **changes):
    from safetensors import safe_open
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    meta["config"].update(changes)
    save_file(load_file(str(src)), str(dst), metadata={METADATA_KEY: json.dumps(meta)})


@pytest.mark.parametrize("change", [dict(B="wide"), dict(d_z=5), dict(widths=[4, 4, 8]), dict(extra=1)])
def test_bad_checkpoint_config_raises_checkpoint_error(tmp_path, change):
    path = tmp_path / "evae.safetensors"
    tiny().save(path)
    _rewrite_config(path, tmp_path / "bad.safetensors", **change)
    with pytest.raises(CheckpointError):
        dkgm_aug.load(tmp_path / "bad.safetensors")


# -- the augmentation API, end to end ------------------------------------------------------------
def test_balanced_dataset_with_a_saved_evae(tmp_path):
    images = images_uint8(12)
    targets = torch.tensor([0] * 9 + [1] * 3)
    ds = ImageDataset(images, targets, ["big", "small"])
    model = tiny()
    fit(model, images, epochs=1, batch_size=6, progress=False)
    path = tmp_path / "evae.safetensors"
    model.save(path)
    bal = BalancedDKGMDataset(ds, generator=path, seed=1, progress=False)
    assert len(bal) == 18 and bal.class_counts == {0: 9, 1: 9} and bal.n_synthetic == 6
    on_demand = [bal[i] for i in range(12, 18)]
    for x, y in on_demand:
        assert y == 1 and x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    fresh = BalancedDKGMDataset(ds, generator=path, seed=1, progress=False).precompute(batch_size=4, progress=False)
    for i, (x, _) in zip(range(12, 18), on_demand):
        assert torch.equal(fresh[i][0], x)   # same per-image seeds, batched or not
    assert torch.equal(bal[0][0], ds[0][0])


# -- Frechet distance and the feature net --------------------------------------------------------
def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    delta = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 0.0])
    assert frechet_distance(a, a + delta) == pytest.approx(float(delta @ delta), rel=1e-8)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a + delta)) == pytest.approx(float(delta @ delta))
    # against the textbook formula with scipy's sqrtm
    from scipy.linalg import sqrtm
    b = rng.normal(size=(300, 6)) * 2 + 1
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb) - 2 * np.trace(sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    with pytest.raises(DataError):
        frechet_distance(a, b[:, :5])
    with pytest.raises(DataError):
        frechet_distance(a[:1], b)


def test_feature_net_train_features_save_load(tmp_path):
    images = images_uint8(24, size=12)
    ds = ImageDataset(images, torch.arange(24) % 3)
    net = train_feature_net(ds, epochs=1, seed=0, batch_size=8, width=4, feature_dim=16, progress=False)
    f = features(net, images.float() / 255)
    assert f.shape == (24, 16) and torch.isfinite(f).all()
    assert torch.equal(features(net, images), f)   # uint8 is divided by 255
    path = tmp_path / "fn.safetensors"
    save_feature_net(net, path)
    loaded = load_feature_net(path)
    assert isinstance(loaded, FeatureNet) and loaded.config() == net.config()
    assert torch.equal(features(loaded, images), f)
    assert features(net, torch.rand(2, 1, 28, 28)).shape == (2, 16)   # any size, adaptive pooling
    tiny().save(tmp_path / "evae.safetensors")
    with pytest.raises(CheckpointError):
        load_feature_net(tmp_path / "evae.safetensors")


# -- the benchmark's --quick mode ----------------------------------------------------------------
@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed (make data)")
def test_evae_vs_vae_benchmark_quick(tmp_path):
    mod = load_benchmark("evae_vs_vae")
    assert mod.main(["--quick", "--no-progress", "--out", str(tmp_path / "q")]) == 0
    md = (tmp_path / "q.md").read_text()
    assert "Frechet distance" in md and "not FID" in md and "| 8 |" in md and "| 64 |" in md
    rows = (tmp_path / "q.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2   # header + (VAE, EVAE) x (d_z 8, 64) x (sample, mean)
    assert all(math.isfinite(float(r.split(",")[5])) for r in rows[1:])


def test_evae_generates_at_its_training_size_only():
    """An EVAE decodes a 32x32 canvas trained on its image_size crop alone: images of another size
    (a Resize(32) before DKGMAugment) came back with an untrained grey frame and no error."""
    model = tiny().eval()
    x = shapes_batch(2, size=8)
    assert dkgm_aug.DKGMAugment(model, p=1.0, seed=0)(x).shape == x.shape
    big = F.pad(x, (1, 1, 1, 1))
    with pytest.raises(DataError, match="trained on 8x8 images"):
        dkgm_aug.DKGMAugment(model, p=1.0, seed=0)(big)
    with pytest.raises(DataError, match="trained on 8x8 images"):
        model.reconstruct(big)


def test_a_users_model_keeps_its_mode_and_generates_in_eval_mode():
    """DKGMAugment and BalancedDKGMDataset used to switch a user's model object to eval mode for good
    (a training loop going on with it trained with frozen BatchNorm statistics); generation runs in
    eval mode, whatever the model's mode, and leaves the mode as it was."""
    model = tiny()
    x = shapes_batch(3, size=8)
    want = dkgm_aug.DKGMAugment(tiny().eval(), p=1.0, seed=0)(x)
    model.train()
    got = dkgm_aug.DKGMAugment(model, p=1.0, seed=0)(x)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(got, want)                       # BatchNorm's running statistics, as in eval mode
    items = [(img, y) for img, y in zip(images_uint8(4), [0, 0, 0, 1])]
    BalancedDKGMDataset(items, model, cache=None, progress=False).precompute(progress=False)
    assert model.training
