"""BalancedDKGMDataset: imbalanced-learn's counts, the index plan, types, caches, workers."""
import os
import pickle
import tracemalloc

import numpy as np
import pytest
import torch
from imblearn.utils import check_sampling_strategy
from PIL import Image

import dkgm_aug
from dkgm_aug import CheckpointError, DataError, DKGMError
from dkgm_aug.balanced import BalancedDKGMDataset, oversampling_targets

LABELS = [0] * 6 + [1] * 3 + [2] * 1   # three classes: 6 + 3 + 1 items


class Images(torch.utils.data.Dataset):
    """Random 8x8 gray images as ``kind`` (uint8/float tensor, numpy HWC, PIL) with ``labels``;
    exposes ``.targets`` only when ``expose`` is set, so the one-pass path is tested too."""

    def __init__(self, labels=LABELS, kind="uint8", expose=True, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (len(labels), 1, 8, 8), generator=g, dtype=torch.uint8)
        self.items = [self._as(img, kind) for img in x]
        self.labels_ = list(labels)
        self.calls = 0
        if expose:
            self.targets = torch.as_tensor(labels) if not (labels and isinstance(labels[0], str)) else list(labels)

    @staticmethod
    def _as(img, kind):
        return {"uint8": img, "float": img.float() / 255, "numpy": img.permute(1, 2, 0).numpy().copy(),
                "pil": Image.fromarray(img[0].numpy())}[kind]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.calls += 1
        return self.items[i], self.labels_[i]


class WithTargets(torch.utils.data.Dataset):
    """A Subset that exposes ``.targets``, so that wrapping it reads no image."""

    def __init__(self, ds, indices):
        self.ds, self.indices = ds, indices
        self.targets = ds.targets[indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.ds[int(self.indices[i])]


def added(b) -> dict:
    return {c: b.class_counts[c] - b.class_counts_before[c] for c in b.class_counts
            if b.class_counts[c] != b.class_counts_before[c]}


# -- counts: imbalanced-learn's semantics ---------------------------------------------------------
MULTI = [2] * 5 + [0] * 5 + [1] * 3 + [4] * 3 + [3] * 1   # majority tie (0, 2), sorted vs first seen
MIN_TIE = [5] * 4 + [3] * 1 + [1] * 1 + [2] * 2             # minority tie (1, 3)
STRINGS = ["cat"] * 4 + ["ant"] * 2 + ["bee"] * 2
BINARY = [1] * 9 + [0] * 3
STRATEGIES = ["auto", "minority", "not minority", "not majority", "all",
              {0: 7, 1: 3}, lambda y: {v: 6 for v in sorted(set(y.tolist()))[::2]}]


def imblearn_or_error(strategy, y):
    try:
        return {k.item() if hasattr(k, "item") else k: v
                for k, v in check_sampling_strategy(strategy, np.asarray(y), "over-sampling").items()}
    except ValueError:
        return ValueError


def ours_or_error(strategy, labels, gen):
    try:
        return BalancedDKGMDataset(Images(labels), gen, strategy, progress=False)
    except DKGMError:
        return ValueError


@pytest.mark.parametrize("labels", [MULTI, MIN_TIE, STRINGS, BINARY], ids=["multi", "min-tie", "str", "binary"])
@pytest.mark.parametrize("strategy", STRATEGIES + [0.5, 0.8, 1.0, 0.2],
                         ids=lambda s: "callable" if callable(s) else repr(s))
def test_counts_match_imblearn(strategy, labels, gen):
    if isinstance(strategy, dict) and isinstance(labels[0], str):
        strategy = {"ant": 5, "bee": 2}
    expected = imblearn_or_error(strategy, labels)
    counts = {c: labels.count(c) for c in sorted(set(labels))}
    ours = ours_or_error(strategy, labels, gen)
    if expected is ValueError:
        assert ours is ValueError
        with pytest.raises(DKGMError):
            oversampling_targets(strategy, counts, np.asarray(labels))
        return
    assert oversampling_targets(strategy, counts, np.asarray(labels)) == expected
    assert added(ours) == {c: n for c, n in expected.items() if n}
    assert ours.n_synthetic == sum(expected.values())


def test_fashion_mnist_long_tailed_auto_is_balanced(gen):
    from dkgm_aug.data import fashion_mnist, long_tailed_indices
    try:
        full = fashion_mnist(split="train")
    except DataError:
        pytest.skip("Fashion-MNIST is not installed under /usr/share/datasets/fashion-mnist")
    lt = WithTargets(full, long_tailed_indices(full.targets, rho=100))
    y = lt.targets.numpy()
    for strategy in ["auto", "minority", "not minority", "not majority", "all", {9: 1000, 3: 3000},
                     lambda y: {c: 2 * int((y == c).sum()) for c in (5, 7)}]:
        b = BalancedDKGMDataset(lt, gen, strategy, progress=False)
        expected = {int(k): v for k, v in check_sampling_strategy(strategy, y, "over-sampling").items()}
        assert added(b) == {c: n for c, n in expected.items() if n}, strategy
    b = BalancedDKGMDataset(lt, gen, "auto", progress=False)
    assert set(b.class_counts.values()) == {6000} and len(b) == 60000 and b.n_real == len(lt)
    assert min(b.class_counts_before.values()) == 60
    for i in (0, len(lt), len(b) - 1):   # synthetic items come from real items of their class
        assert b.targets[i] == int(full.targets[lt.indices[b.source_index(i)]])


def test_one_pass_label_path_and_label_types(gen):
    for labels in ([torch.tensor(v) for v in MULTI], [np.int64(v) for v in MULTI], STRINGS):
        ds = Images(labels, expose=False)
        b = BalancedDKGMDataset(ds, gen, progress=False)
        plain_labels = [v.item() if hasattr(v, "item") else v for v in labels]
        assert b.class_counts_before == {c: plain_labels.count(c) for c in set(plain_labels)}
        assert len(set(b.class_counts.values())) == 1
        assert ds.calls == len(labels)   # exactly one pass
        assert b.targets[:len(labels)] == plain_labels
    b = BalancedDKGMDataset(Images([torch.tensor(v) for v in BINARY], expose=False), gen, progress=False)
    image, label = b[len(BINARY)]
    assert isinstance(label, torch.Tensor) and label.item() == 0   # the base dataset's own label


# -- the index plan and items -----------------------------------------------------------------
def test_real_items_unchanged_and_plan_consistent(gen):
    ds = Images(kind="pil")
    b = BalancedDKGMDataset(ds, gen, progress=False)
    assert (b.n_real, b.n_synthetic, len(b)) == (10, 8, 18)
    for i in range(b.n_real):
        assert b[i][0] is ds[i][0] and b[i][1] == ds[i][1]
        assert not b.is_synthetic(i) and b.source_index(i) == i
    assert b.targets == LABELS + [1] * 3 + [2] * 5   # grouped by class
    for i in range(b.n_real, len(b)):
        src = b.source_index(i)
        assert b.is_synthetic(i) and src < b.n_real and b[i][1] == ds[src][1] == b.targets[i]
    assert sorted(b.source_index(i) for i in range(10, 13)) == [6, 7, 8]   # a permutation, then cycles
    assert {b.source_index(i) for i in range(13, 18)} == {9}
    assert np.array_equal(np.asarray(b[-1][0]), np.asarray(b[17][0])) and b.is_synthetic(-1)
    for bad in (18, -19):
        with pytest.raises(IndexError):
            b[bad]


def test_determinism(gen):
    a, b = (BalancedDKGMDataset(Images(), gen, seed=3, progress=False) for _ in range(2))
    c = BalancedDKGMDataset(Images(), gen, seed=4, progress=False)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(10, len(a)))
    assert not torch.equal(a[10][0], a[11][0])   # not constant images


@pytest.mark.parametrize("kind", ["pil", "uint8", "float", "numpy"])
def test_types_preserved(kind, gen):
    ds = Images(kind=kind)
    b = BalancedDKGMDataset(ds, gen, progress=False)
    real, fake = b[0][0], b[len(b) - 1][0]
    assert type(fake) is type(real)
    if kind == "pil":
        assert (fake.mode, fake.size) == ("L", (8, 8))
    else:
        assert (fake.dtype, tuple(fake.shape)) == (real.dtype, tuple(real.shape))
    if kind == "float":
        assert 0 <= fake.min() and fake.max() <= 1
        assert torch.equal(fake, (fake * 255).round() / 255)   # quantized to 256 levels
    twice = b[len(b) - 1][0]
    assert np.array_equal(np.asarray(twice), np.asarray(fake))


def test_rgb_pil_and_transform(gen):
    ds = Images(kind="pil")
    ds.items = [im.convert("RGB") for im in ds.items]
    b = BalancedDKGMDataset(ds, gen, convert_channels=True, transform=lambda im: np.asarray(im).sum(),
                            progress=False)
    assert b[0][0] == np.asarray(ds[0][0]).sum()
    assert isinstance(b[12][0], np.integer)
    bare = BalancedDKGMDataset(ds, gen, convert_channels=True, progress=False)
    assert bare[12][0].mode == "RGB" and b[12][0] == np.asarray(bare[12][0]).sum()
    with pytest.raises(DataError, match="convert_channels"):
        BalancedDKGMDataset(ds, gen, progress=False)[12]
    ds.items = [im.convert("P") for im in ds.items]   # other modes go through RGB and come back
    fake = BalancedDKGMDataset(ds, gen, convert_channels=True, progress=False)[12][0]
    assert (fake.mode, fake.size) == ("P", (8, 8))


def test_precompute_equals_on_demand(gen):
    lazy = BalancedDKGMDataset(Images(), gen, progress=False, cache=None)
    eager = BalancedDKGMDataset(Images(), gen, progress=False).precompute(batch_size=3, progress=False)
    assert eager._model is not None and len(eager._cache) == eager.n_synthetic
    for i in range(lazy.n_real, len(lazy)):
        assert (lazy[i][0].int() - eager[i][0].int()).abs().max() <= 1
    assert not lazy._cache   # cache=None keeps nothing


def test_dataloader_batches_generation_through_getitems(gen, monkeypatch):
    """A DataLoader hands __getitems__ a whole batch: one generator call per batch, images equal
    to item-by-item access, repeated indices generated once, and cache=None keeps nothing."""
    import dkgm_aug.augment as augment      # the one generation path every API goes through
    calls = []
    real_generate = augment.generate
    monkeypatch.setattr(augment, "generate", lambda model, x, *a, **k: calls.append(len(x)) or real_generate(model, x, *a, **k))
    b = BalancedDKGMDataset(Images(), gen, progress=False, cache=None)
    order = list(range(len(b)))[::-1] + [len(b) - 1, len(b) - 1]
    loader = torch.utils.data.DataLoader(b, batch_size=8, sampler=order)
    got = torch.cat([x for x, _ in loader])
    n_batches = -(-len(order) // 8)
    assert len(calls) <= n_batches and sum(calls) < len(order)   # batched, duplicates made once
    one_by_one = BalancedDKGMDataset(Images(), gen, progress=False, cache=None)
    expect = torch.stack([one_by_one[i][0] for i in order])
    assert got.dtype == torch.uint8 and (got.int() - expect.int()).abs().max() <= 1   # batched conv rounding
    assert not b._cache


def test_getitems_reads_each_source_once(gen):
    ds = Images()
    b = BalancedDKGMDataset(ds, gen, progress=False, cache=None)
    synthetic = list(range(b.n_real, len(b)))
    b.__getitems__(synthetic[:1])       # the first generation reads one source 5 times more, once (a check)
    ds.calls = 0
    b.__getitems__(synthetic)
    assert ds.calls == len(synthetic)   # one read per item: generation and the returned item share it


def test_getitems_mixed_sizes(gen):
    """Sources of different sizes are generated in one batch per size."""
    class Sized(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(1)
            self.items = [(torch.randint(0, 256, (1, 8, 8 if k % 2 else 16), generator=g, dtype=torch.uint8), int(k > 5))
                          for k in range(8)]
            self.targets = [y for _, y in self.items]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]
    b = BalancedDKGMDataset(Sized(), gen, progress=False)
    items = b.__getitems__(range(len(b)))
    assert [tuple(x.shape) for x, _ in items[b.n_real:]] == [tuple(b.ds[b.source_index(i)][0].shape)
                                                             for i in range(b.n_real, len(b))]


# -- cache files --------------------------------------------------------------------------------
def test_cache_file_round_trip(gen, tmp_path):
    path = tmp_path / "synth.safetensors"
    knobs = dict(alpha=np.float32(0.5), steps=np.int64(2))   # numpy knobs must reach JSON as numbers
    a = BalancedDKGMDataset(Images(), gen, cache=path, progress=False, **knobs)
    with pytest.raises(DKGMError, match="precompute"):
        a.save_cache(tmp_path / "early.safetensors")
    a.precompute(progress=False)
    assert path.is_file()
    b = BalancedDKGMDataset(Images(), gen, cache=str(path), progress=False, **knobs)
    assert len(b._cache) == b.n_synthetic
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    assert b._model is None   # served from the file: the generator was never loaded
    mtime = path.stat().st_mtime_ns
    b.precompute(progress=False)
    assert path.stat().st_mtime_ns == mtime   # nothing new, nothing rewritten
    with pytest.raises(DKGMError, match="delete it or pass a new cache path"):
        BalancedDKGMDataset(Images(), gen, cache=path, seed=1, progress=False, **knobs)
    with pytest.raises(DKGMError, match="delete it or pass a new cache path"):
        BalancedDKGMDataset(Images(), gen, cache=path, alpha=0.1, progress=False)
    with pytest.raises(DKGMError, match="not a BalancedDKGMDataset cache"):
        BalancedDKGMDataset(Images(), gen, cache=gen, progress=False)
    c = BalancedDKGMDataset(Images(), gen, progress=False, **knobs).load_cache(path)
    assert torch.equal(c[len(c) - 1][0], a[len(a) - 1][0])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_rebuilt(damage, gen, tmp_path):
    path = tmp_path / "synth.safetensors"
    good = BalancedDKGMDataset(Images(), gen, cache=path, progress=False).precompute(progress=False)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-20]
    else:
        data[-5] ^= 0xFF   # inside the image bytes: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="truncated or corrupt|corrupt"):
        b = BalancedDKGMDataset(Images(), gen, cache=path, progress=False)
    assert not b._cache
    with pytest.raises(CheckpointError):
        BalancedDKGMDataset(Images(), gen, progress=False).load_cache(path)
    b.precompute(progress=False)
    again = BalancedDKGMDataset(Images(), gen, cache=path, progress=False)
    assert len(again._cache) == again.n_synthetic
    assert all(torch.equal(again[i][0], good[i][0]) for i in range(len(good)))


# -- workers and pickling -------------------------------------------------------------------------
def test_dataloader_fork_workers(gen):
    b = BalancedDKGMDataset(Images(), gen, progress=False)
    loader = torch.utils.data.DataLoader(b, batch_size=4, num_workers=2, multiprocessing_context="fork")
    images, labels = zip(*loader)
    assert torch.equal(torch.cat(images), torch.stack([b[i][0] for i in range(len(b))]))
    assert torch.cat(labels).tolist() == b.targets


def test_pickle_is_small_with_a_path_generator(gen):
    b = BalancedDKGMDataset(Images(), gen, progress=False)
    b[len(b) - 1]   # loads the generator
    assert b._model is not None
    blob = pickle.dumps(b)
    assert len(blob) < 20_000 < os.path.getsize(gen)
    c = pickle.loads(blob)
    assert c._model is None and torch.equal(c[len(c) - 2][0], b[len(b) - 2][0])
    with_model = BalancedDKGMDataset(Images(), dkgm_aug.load(gen), progress=False)
    assert len(pickle.dumps(with_model)) > os.path.getsize(gen) // 2   # a model object travels whole


# -- scale and errors -------------------------------------------------------------------------------
class Million(torch.utils.data.Dataset):
    def __init__(self, n=1_000_000):
        self.targets = torch.from_numpy(np.random.default_rng(0).zipf(1.5, n) % 10)
        self.loaded = []

    def __len__(self):
        return len(self.targets)

        self.loaded = []

    def __getitem__(self, i):
        self.loaded.append(i)
        return torch.zeros(1, 8, 8), self.targets[i]


def test_wrapping_a_million_items_is_compact(gen):
    ds = Million()
    tracemalloc.start()
    b = BalancedDKGMDataset(ds, gen, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(ds.loaded) <= 16 + 64     # stored targets checked on 16 spread items and the 64 smallest classes
    kept = sum(t.numel() * t.element_size() for t in (b._codes, b._sources))
    assert kept == 4 * len(b) + 4 * b.n_synthetic   # an int32 class code per item, an int32 source per synthetic one
    assert peak < 64 * 2 ** 20
    assert len(set(b.class_counts.values())) == 1 and b.n_real == 1_000_000


def test_trusting_stored_labels_reads_a_bounded_number_of_items_however_many_classes(gen):
    """One item of each class was read to check the stored labels: 1,000 image loads for a
    1,000-class folder. Only the 64 smallest classes' first items are read, besides the 16 spread ones."""
    ds = Million(20_000)
    ds.targets = torch.arange(20_000) % 1000
    b = BalancedDKGMDataset(ds, gen, progress=False)
    assert len(ds.loaded) <= 16 + 64 and len(b.class_values) == 1000


def test_errors(gen, tmp_path):
    with pytest.raises(DataError, match="empty"):
        BalancedDKGMDataset(Images([]), gen)
    with pytest.raises(DKGMError, match=r"classes \[7\].*not in the dataset"):
        BalancedDKGMDataset(Images(), gen, {7: 10})
    with pytest.raises(DKGMError, match="already has 6"):
        BalancedDKGMDataset(Images(), gen, {0: 5})
    with pytest.raises(DKGMError, match="exactly 2 classes.*dict"):
        BalancedDKGMDataset(Images(), gen, 0.5)
    with pytest.raises(DKGMError, match="'auto'.*'not majority'"):
        BalancedDKGMDataset(Images(), gen, "balanced")
    with pytest.raises(DKGMError, match="majority"):
        BalancedDKGMDataset(Images(), gen, "majority")
    with pytest.raises(DataError, match="only 1 class"):
        BalancedDKGMDataset(Images([3] * 4), gen)
    with pytest.raises(DKGMError, match="alpha"):
        BalancedDKGMDataset(Images(), gen, alpha=-1)
    with pytest.raises(DKGMError, match="steps"):
        BalancedDKGMDataset(Images(), gen, alpha=0.5, steps=1.5)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        BalancedDKGMDataset(Images(), tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        BalancedDKGMDataset(Images(), "no-such-shipped-generator")
    with pytest.raises(DKGMError, match="not a dkgm_aug generator"):
        BalancedDKGMDataset(Images(), torch.nn.Linear(2, 2))
    with pytest.raises(DKGMError, match="cache"):
        BalancedDKGMDataset(Images(), gen, cache="disk")
    with pytest.raises(DataError, match="one label per item"):
        ds = Images()
        ds.targets = torch.zeros(10, 3)
        BalancedDKGMDataset(ds, gen)


def test_labels_come_from_the_items_when_stored_targets_are_not_theirs(gen):
    """A dataset whose .targets differ from what its items return (a target_transform; another
    label_key) is balanced by the labels the items give, not by .targets (it balanced the wrong
    classes and served 3:1)."""
    class Relabelled(torch.utils.data.Dataset):
        targets = [0] * 6 + [1, 1, 2, 2, 3, 3]
        target_transform = staticmethod(lambda y: int(y >= 1))

        def __len__(self):
            return 12

        def __getitem__(self, i):
            return torch.full((1, 8, 8), i / 12), self.target_transform(self.targets[i])
    ds = BalancedDKGMDataset(Relabelled(), gen, cache=None, progress=False)
    assert ds.class_counts_before == {0: 6, 1: 6} and ds.n_synthetic == 0

    class Coarse(torch.utils.data.Dataset):
        targets = [0, 1, 2, 3, 4, 5]                    # the fine labels; items hold a coarse one too

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"image": torch.full((1, 8, 8), i / 6), "label": self.targets[i], "coarse": int(i > 0)}
    ds = BalancedDKGMDataset(Coarse(), gen, label_key="coarse", cache=None, progress=False)
    assert ds.class_counts_before == {0: 1, 1: 5}


def test_synthetic_items_keep_a_wide_or_palette_sources_mode_and_levels():
    """A 16-bit source's synthetic item is 16-bit at the source's scale (it was the 8-bit values in
    a 16-bit image, ~250x darker); a palette source's keeps its palette (it was dithered to the
    216-colour web palette)."""
    from PIL import Image
    from dkgm_aug.balanced import _like
    q = torch.arange(64, dtype=torch.uint8).view(1, 8, 8) * 4
    wide = Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000))
    out = _like(q, wide)
    assert out.mode == wide.mode and np.array_equal(np.asarray(out).astype(np.int64),
                                                     np.round(q[0].numpy() / 255 * 65535).astype(np.int64))
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).convert("P")
    palette = gray.quantize(colors=64)
    back = np.asarray(_like(q, palette).convert("L")).astype(int)
    assert np.abs(back - q[0].numpy()).max() <= 8


def test_synthetic_items_keep_a_tv_tensor_type_and_an_alpha_channel():
    """A tv_tensors.Image source gives a tv_tensors.Image (it gave a plain tensor, which v2
    transforms then treat differently); an RGBA or LA source keeps its own alpha (it came back opaque)."""
    from torchvision import tv_tensors
    from dkgm_aug.balanced import _like
    q = torch.arange(48, dtype=torch.uint8).view(3, 4, 4) * 5
    assert isinstance(_like(q, tv_tensors.Image(torch.zeros(3, 4, 4, dtype=torch.uint8))), tv_tensors.Image)
    alpha = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    rgba = Image.fromarray(np.dstack([np.zeros((4, 4, 3), np.uint8), alpha]), mode="RGBA")
    out = _like(q, rgba)
    assert out.mode == "RGBA" and np.array_equal(np.asarray(out)[..., 3], alpha)
    assert np.array_equal(np.asarray(out)[..., :3], q.permute(1, 2, 0).numpy())
    la = Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), alpha]), mode="LA")
    out = _like(q[:1], la)
    assert out.mode == "LA" and np.array_equal(np.asarray(out)[..., 1], alpha)
    premultiplied = rgba.convert("RGBa")            # its alpha band is named "a"
    assert _like(q, premultiplied).mode == "RGBa"
    from dkgm_aug.images import source_unit
    assert source_unit(la.convert("La")).shape == (1, 4, 4)


@pytest.mark.parametrize("bank", [None, 2])
def test_precompute_on_another_device_never_moves_the_users_model(bank):
    """``precompute(device=...)`` (and the bank's build) moved the model object the user had passed
    as the generator to that device in place (``self._model.to(device)``), though the docs promise it
    is never changed. The "meta" device stands in for "cuda" here: generation on it fails, the move
    must not have happened."""
    model = dkgm_aug.load("digits-tiny").eval()
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    ds = BalancedDKGMDataset(list(zip(x, [0, 0, 0, 0, 1, 1])), model, progress=False, bank=bank)
    with pytest.raises((RuntimeError, NotImplementedError)):
        ds.precompute(device="meta", progress=False)
    assert next(model.parameters()).device.type == "cpu"


def test_label_minus_one_beside_zero_warns_when_the_dataset_names_no_classes():
    """-1 beside 0..K with no class names is balanced as a class (it may be a real one), with a warning:
    it usually marks unlabelled items."""
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    with pytest.warns(UserWarning, match="2 items have label -1, balanced as a class of its own"):
        ds = BalancedDKGMDataset(list(zip(x, [0, 0, 1, -1, -1])), "digits-tiny", progress=False)
    assert ds.class_counts == {-1: 2, 0: 2, 1: 2}


def test_concat_parts_that_number_their_classes_differently_are_warned_about():
    """A ConcatDataset of an image folder (cat, dog, eel) and an extra one without dogs (cat, eel) was
    balanced by raw label number with no word: the extra folder's eels (its label 1) were counted,
    oversampled and generated as dogs. Now a warning says so (the labels may have been remapped by
    a target_transform, so it is not refused); parts whose names agree where they overlap, or that
    have only the automatic '0', '1', ... names, give the longest list of names, silently."""
    import warnings
    from torch.utils.data import ConcatDataset
    from dkgm_aug.data import ImageDataset
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    a = ImageDataset(x, torch.tensor([0, 0, 0, 1, 2, 2]), ["cat", "dog", "eel"])
    b = ImageDataset(x[:3], torch.tensor([0, 1, 1]), ["cat", "eel"])
    with pytest.warns(UserWarning, match="name their classes differently \\('eel' at label 1 in one, 'dog' in another"):
        assert BalancedDKGMDataset(ConcatDataset([a, b]), "digits-tiny", progress=False).classes == [0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = [0, 0, 0, 1, 2, 2, 0, 2, 2]                   # the user's own mapping: taken as given
        BalancedDKGMDataset(ConcatDataset([a, b]), "digits-tiny", labels=labels, progress=False)
        for other in (ImageDataset(x[:3], torch.tensor([0, 1, 1]), ["cat", "dog"]),
                      ImageDataset(x[:3], torch.tensor([0, 1, 1]))):          # automatic names '0', '1', '2'
            ds = BalancedDKGMDataset(ConcatDataset([a, other]), "digits-tiny", progress=False)
            assert ds.classes == ["cat", "dog", "eel"]
