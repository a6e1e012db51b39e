"""Kernel-smoothed empirical score generator (dkgm_aug/kss/): score maths, streaming,
memorisation, the generator interface, checkpoints and oversampling."""
import json

import pytest
import torch

import dkgm_aug
from dkgm_aug import BalancedDKGMDataset, CheckpointError, DKGMError
from dkgm_aug.kss import device_cache as kss_mod
from dkgm_aug.data import ImageDataset
from dkgm_aug.kss import (KernelSmoothedScore, empirical_score, memorisation, nearest_neighbour_distances,
                          smoothed_score)
from conftest import load_benchmark



def random_set(n=10, size=4, seed=0, low=0, high=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 1, size, size), generator=g).to(torch.uint8)


def two_class_set(n_per_class=5, size=4):
    dark = random_set(n_per_class, size, seed=1, low=0, high=60)
    bright = random_set(n_per_class, size, seed=2, low=196, high=256)
    return torch.cat([dark, bright]), [0] * n_per_class + [1] * n_per_class


# -- score maths ---------------------------------------------------------------------------------
def test_empirical_score_is_gradient_of_log_mixture():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 4, generator=g, dtype=torch.float64)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for t in (0.05, 0.7, 3.0):
        log_p = torch.logsumexp(-(x[:, None] - ref[None]).pow(2).sum(-1) / (2 * t), dim=1)   # + constants
        (grad,) = torch.autograd.grad(log_p.sum(), x)
        score = empirical_score(x.detach(), ref, t)
        assert torch.allclose(score, grad, rtol=1e-10, atol=1e-10)


def test_smoothed_score_tends_to_exact_score():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(7, 3, generator=g, dtype=torch.float64)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    exact = empirical_score(x, ref, 0.3)
    assert torch.equal(smoothed_score(x, ref, 0.3, 0.0), exact)
    tiny = smoothed_score(x, ref, 0.3, 1e-7, n_smooth=5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(tiny, exact, rtol=1e-5, atol=1e-5)
    # a real bandwidth changes it, and the estimate is the mean of the empirical score over x + h xi
    xi = torch.randn(4, 6, 3, generator=g, dtype=torch.float64)
    smooth = smoothed_score(x, ref, 0.3, 0.5, xi=xi)
    direct = torch.stack([empirical_score(x + 0.5 * xi[:, s], ref, 0.3) for s in range(6)]).mean(0)
    # the estimator keeps the mean-zero h*xi term out: smooth = direct + h * mean(xi) / t
    assert torch.allclose(smooth, direct + 0.5 * xi.mean(1) / 0.3, atol=1e-10)
    assert not torch.allclose(smooth, exact, atol=1e-3)


def test_chunked_equals_unchunked_and_is_stable():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(11, 5, generator=g, dtype=torch.float64) * 10      # far apart: huge logits at small t
    x = torch.randn(3, 5, generator=g, dtype=torch.float64) * 10
    for t in (1e-4, 0.5, 50.0):
        whole = empirical_score(x, ref, t, chunk_size=4096)
        for cs in (1, 2, 5):
            assert torch.allclose(empirical_score(x, ref, t, chunk_size=cs), whole, rtol=1e-9, atol=1e-9)
        assert torch.isfinite(whole).all()
    d_whole, i_whole = nearest_neighbour_distances(x, ref, 3)
    d_chunk, i_chunk = nearest_neighbour_distances(x, ref, 3, chunk_size=2)
    assert torch.allclose(d_whole, d_chunk) and torch.equal(i_whole, i_chunk)
    brute = torch.cdist(x, ref).sort(1)
    assert torch.allclose(d_whole, brute.values[:, :3]) and torch.equal(i_whole, brute.indices[:, :3])


def test_model_streaming_path_matches_cached_path(monkeypatch):
    images, labels = two_class_set()
    x = images[:4].float() / 127.5 - 1
    model = KernelSmoothedScore(images, labels, h=0.3, steps=5, n_smooth=2, chunk_size=2)
    cached = model.neighbours_from_seeds(x, [1, 2, 3, 4], labels=labels[:4])
    monkeypatch.setattr(kss_mod, "CACHE_ELEMENTS", 0)
    model._cache = {}
    streamed = model.neighbours_from_seeds(x, [1, 2, 3, 4], labels=labels[:4])
    assert torch.allclose(cached, streamed, atol=1e-5)


# -- memorisation --------------------------------------------------------------------------------
def test_memorisation_metric():
    train = random_set(12, seed=3)
    assert memorisation(train, train) == 1.0
    far = torch.full((5, 1, 4, 4), 0.0)              # all between training images: not copies
    assert memorisation(far, train) == 0.0
    with pytest.raises(DKGMError):
        memorisation(train, train[:1])
    with pytest.raises(DKGMError):
        memorisation(train, train, ratio=0)


def test_exact_score_memorises_and_smoothing_does_not():
    train = random_set(10, seed=4)
    model = KernelSmoothedScore(train, h=0.0, steps=40)
    exact = model.sample(30, seeds=range(30))
    assert memorisation(exact, train) > 0.9
    smooth = model.sample(30, seeds=range(30), h=2.0)
    assert memorisation(smooth, train) < 0.5 * memorisation(exact, train)
    d_exact = nearest_neighbour_distances(exact, train)[0][:, 0].mean()
    d_smooth = nearest_neighbour_distances(smooth, train)[0][:, 0].mean()
    assert d_smooth > 2 * d_exact


# -- generator interface -------------------------------------------------------------------------
def test_shapes_range_and_seeds():
    images, labels = two_class_set()
    model = KernelSmoothedScore(images, labels, h=0.2, steps=6, n_smooth=3)
    x = images.float() / 127.5 - 1
    seeds = list(range(100, 110))
    out = model.neighbours_from_seeds(x, seeds, labels=labels)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, model.neighbours_from_seeds(x, seeds, labels=labels))
    assert not torch.equal(out, model.neighbours_from_seeds(x, [s + 1 for s in seeds], labels=labels))
    alone = model.neighbours_from_seeds(x[7:8], seeds[7:8], labels=labels[7:8])   # batch independent
    assert torch.allclose(alone, out[7:8], atol=1e-6)
    many = model.neighbours(x[:2], 3, labels=labels[:2], generator=torch.Generator().manual_seed(0))
    assert many.shape == (2, 3, 1, 4, 4)
    assert torch.equal(model.neighbours_from_seeds(x, seeds, labels=labels, alpha=0.0), x.clamp(-1, 1))
    s = model.sample(4, labels=1, seeds=range(4))
    assert s.shape == (4, 1, 4, 4) and s.min() >= -1 and s.max() <= 1
    x64 = model.neighbours_from_seeds(x.double()[:2], [0, 1], labels=[0, 1])
    assert x64.dtype == torch.float64


def test_per_class_neighbours_use_only_that_class():
    images, labels = two_class_set()
    model = KernelSmoothedScore(images, labels, h=0.0, steps=20)
    grey = torch.zeros(6, 1, 4, 4)           # half way between the dark and the bright class
    for label in (0, 1):
        out = model.neighbours_from_seeds(grey, list(range(6)), labels=[label] * 6, alpha=0.5)
        _, idx = nearest_neighbour_distances(out, images, 1)
        assert all(labels[i] == label for i in idx[:, 0].tolist())
    # without labels the whole set is used, and an unlabelled model ignores labels
    unlabelled = KernelSmoothedScore(images, steps=5)
    assert unlabelled.neighbours_from_seeds(grey[:2], [0, 1], labels=[7, 8]).shape == (2, 1, 4, 4)


def test_string_labels():
    images, labels = two_class_set()
    model = KernelSmoothedScore(images, ["cat" if y else "dog" for y in labels], steps=3)
    assert model.classes == ["cat", "dog"]
    assert model.sample(2, labels="cat", seeds=[0, 1]).shape == (2, 1, 4, 4)
    with pytest.raises(DKGMError, match="unknown class label"):
        model.sample(2, labels=1)


# -- checkpoints ---------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    images, labels = two_class_set()
    model = KernelSmoothedScore(images, labels, h=0.3, steps=4, n_smooth=2, alpha=0.4, t_min=2e-3)
    path = tmp_path / "kss.safetensors"
    model.save(path, classes=["dark", "bright"])
    loaded = dkgm_aug.load(path)
    assert isinstance(loaded, KernelSmoothedScore) and loaded.kind == "kss"
    assert loaded.config() == model.config()
    assert json.loads(json.dumps(loaded.config())) == loaded.config()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert loaded.images.dtype == torch.uint8 and loaded.label_codes.tolist() == [0] * 5 + [1] * 5
    x = images[:3].float() / 127.5 - 1
    assert torch.equal(model.neighbours_from_seeds(x, [5, 6, 7], labels=[0, 0, 0]),
                       loaded.neighbours_from_seeds(x, [5, 6, 7], labels=[0, 0, 0]))
    unlabelled = KernelSmoothedScore(images, steps=2)
    unlabelled.save(tmp_path / "u.safetensors")
    assert dkgm_aug.load(tmp_path / "u.safetensors").classes is None


def test_load_rejects_bad_config(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from dkgm_aug.checkpoint import METADATA_KEY
    path = tmp_path / "kss.safetensors"
    KernelSmoothedScore(*two_class_set(), steps=2).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in (("h", -1.0), ("steps", 0), ("n", 11), ("classes", None)):
        bad = json.loads(json.dumps(meta))
        bad["config"][key] = value
        save_file(tensors, tmp_path / "bad.safetensors", metadata={METADATA_KEY: json.dumps(bad)})
        with pytest.raises(CheckpointError):
            dkgm_aug.load(tmp_path / "bad.safetensors")
    tensors["label_codes"] = torch.full_like(tensors["label_codes"], 5)
    save_file(tensors, tmp_path / "bad.safetensors", metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(DKGMError, match="label_codes"):
        dkgm_aug.load(tmp_path / "bad.safetensors")


def test_balanced_dataset_end_to_end(tmp_path):
    images, labels = two_class_set(n_per_class=6, size=8)
    keep = list(range(6)) + [6, 7]                   # class 0: 6 images, class 1: 2
    ds = ImageDataset(images[keep], [labels[i] for i in keep], ["dark", "bright"])
    path = tmp_path / "kss.safetensors"
    KernelSmoothedScore.from_dataset(ds, h=0.5, steps=5, n_smooth=2).save(path)
    bal = BalancedDKGMDataset(ds, generator=path, progress=False)
    assert len(bal) == 12 and bal.class_counts == {0: 6, 1: 6}
    x, y = bal[len(bal) - 1]
    assert bal.is_synthetic(len(bal) - 1) and y == 1 and x.shape == (1, 8, 8)
    assert x.mean() > 0.6                            # a bright-class neighbour
    bal.precompute(batch_size=3, progress=False)
    assert torch.equal(bal[len(bal) - 1][0], x)      # same image on demand and in batches


# -- bad inputs ----------------------------------------------------------------------------------
def test_bad_inputs():
    images, labels = two_class_set()
    with pytest.raises(DKGMError, match="h"):
        KernelSmoothedScore(images, h=-0.1)
    with pytest.raises(DKGMError, match="steps"):
        KernelSmoothedScore(images, steps=0)
    with pytest.raises(DKGMError, match="empty"):
        KernelSmoothedScore(torch.zeros(0, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(DKGMError, match="uint8"):
        KernelSmoothedScore(images.float())
    with pytest.raises(DKGMError, match="labels"):
        KernelSmoothedScore(images, labels[:3])
    with pytest.raises(DKGMError, match="n_smooth"):
        KernelSmoothedScore(images, n_smooth=0)
    model = KernelSmoothedScore(images, labels, steps=2)
    x = images[:2].float() / 127.5 - 1
    with pytest.raises(DKGMError, match="unknown class label 3"):
        model.neighbours_from_seeds(x, [0, 1], labels=[0, 3])
    with pytest.raises(DKGMError, match="steps"):
        model.neighbours_from_seeds(x, [0, 1], steps=0)
    with pytest.raises(DKGMError, match="h"):
        model.neighbours_from_seeds(x, [0, 1], h=-1)
    with pytest.raises(DKGMError, match="seeds"):
        model.neighbours_from_seeds(x, [0])
    with pytest.raises(DKGMError, match="size"):
        model.neighbours_from_seeds(torch.zeros(1, 1, 5, 5), [0])
    with pytest.raises(DKGMError, match="alpha"):
        model.neighbours_from_seeds(x, [0, 1], alpha=-1)
    with pytest.raises(DKGMError):
        model.sample(0)
    with pytest.raises(DKGMError, match="without labels"):
        KernelSmoothedScore(images, steps=2).sample(2, labels=0)
    with pytest.raises(DKGMError):
        KernelSmoothedScore.from_config({"n": 3})


# -- benchmark -----------------------------------------------------------------------------------
def test_kss_memorisation_quick(tmp_path):
    mod = load_benchmark("kss_memorisation")
    rows = mod.main(["--quick", "--out", str(tmp_path / "r")])
    text = (tmp_path / "r.md").read_text()
    assert "| h |" in text and (tmp_path / "r.csv").stat().st_size > 0 and (tmp_path / "r.png").stat().st_size > 0
    exact = [r for r in rows if r["mode"] == "sample" and r["h"] == 0]
    assert exact and all(r["memorisation"] >= 0.9 for r in exact)


def test_per_class_score_takes_numpy_labels_like_tensor_labels():
    """A numpy label array (aug(x, y) with y from a numpy pipeline, or a 0-d array) was not taken for
    a label: a per-class score model then drew from the whole set, silently."""
    import numpy as np
    images, labels = two_class_set(n_per_class=6, size=4)
    model = KernelSmoothedScore(images, labels=labels, h=0.05, steps=5)
    x = torch.full((4, 1, 4, 4), 0.5)
    want = dkgm_aug.DKGMAugment(model, p=1.0, seed=0)(x, torch.ones(4, dtype=torch.long))[0]
    got = dkgm_aug.DKGMAugment(model, p=1.0, seed=0)(x, np.ones(4, dtype=np.int64))[0]
    assert torch.equal(got, want)
    one = dkgm_aug.DKGMAugment(model, p=1.0, seed=0)(x[0], np.array(1))[0]
    assert torch.equal(one, dkgm_aug.DKGMAugment(model, p=1.0, seed=0)(x[0], 1)[0])
    assert float(got.mean()) > 0.6                     # the bright class's neighbours


def test_cli_sample_draws_a_per_class_models_neighbours_from_the_sources_class(tmp_path):
    """`dkgm-aug sample` passed labels to a class-conditional DKGM only: a per-class score model's
    grid showed neighbours of the whole set (half of them of another class) and exited 0."""
    import numpy as np
    from PIL import Image
    from dkgm_aug.cli import main
    images, labels = two_class_set(n_per_class=6, size=8)
    KernelSmoothedScore(images, labels=labels, h=0.05, steps=5).save(tmp_path / "kss.safetensors")
    np.savez(tmp_path / "src.npz", images=np.full((4, 8, 8), 128, np.uint8), labels=np.zeros(4, np.int64))
    assert main(["sample", str(tmp_path / "kss.safetensors"), "--data", str(tmp_path / "src.npz"), "--n", "4",
                 "--k", "3", "--out", str(tmp_path / "grid.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("L")).astype(float)
    tiles = [grid[1 + r * 9:9 + r * 9, 1 + c * 9:9 + c * 9].mean() for r in range(4) for c in range(1, 4)]
    assert max(tiles) < 100                             # every neighbour from the dark class 0


def test_cached_float_copies_follow_relabelled_reassigned_and_replaced_buffers():
    """The float copies of the set were keyed on the image buffer's device and version only: an
    in-place relabel (label_codes), a new images tensor assigned whose version matched, or
    ``images.data = ...`` kept serving the old class members and pixels."""
    def build():
        g = torch.Generator().manual_seed(0)
        return KernelSmoothedScore(torch.randint(0, 256, (6, 1, 4, 4), generator=g, dtype=torch.uint8),
                                   [0, 0, 0, 1, 1, 1], h=0.0, steps=5)

    def fresh(m):
        return KernelSmoothedScore(m.images.clone(), [m.classes[c] for c in m.label_codes.tolist()], h=0.0, steps=5)
    m = build(); m.set_mean(0); m.set_mean(1)
    m.label_codes[0] = 1
    assert torch.equal(m.set_mean(0), fresh(m).set_mean(0)) and torch.equal(m.set_mean(1), fresh(m).set_mean(1))
    m = build(); m.set_mean(0)
    new = 255 - m.images.clone()
    new.add_(0)                                   # version 1, as the buffer's after its copy_
    m.images = new
    assert torch.equal(m.set_mean(0), fresh(m).set_mean(0))
    m = build(); m.set_mean(0)
    m.images.data = 255 - m.images.clone()
    assert torch.equal(m.set_mean(0), fresh(m).set_mean(0))
    m, x = build(), torch.rand(2, 1, 4, 4) * 2 - 1
    m.neighbours_from_seeds(x, [1, 2], labels=[0, 1])
    new = 255 - m.images.clone()
    new.add_(0)
    m.images = new
    assert torch.equal(m.neighbours_from_seeds(x, [1, 2], labels=[0, 1]),
                       fresh(m).neighbours_from_seeds(x, [1, 2], labels=[0, 1]))
