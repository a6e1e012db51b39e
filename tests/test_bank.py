"""Neighbour banks: made once through the generation path, reopened by fingerprint, drawn from by
BankAugment and by BalancedDKGMDataset(bank=k) (another neighbour each epoch), shared by workers."""
import multiprocessing
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from conftest import micro_model
from PIL import Image

import dkgm_aug.balanced
import dkgm_aug.bank
from dkgm_aug import BalancedDKGMDataset, BankAugment, DataError, DKGMError, NeighbourBank
from dkgm_aug.augment import generate, load_generator
from dkgm_aug.bank import neighbour_seed

LABELS = [0] * 6 + [1] * 3 + [2] * 1


class Items(torch.utils.data.Dataset):
    """Random 8x8 gray uint8 images with LABELS; ``transform`` applies to the image."""

    def __init__(self, labels=LABELS, seed=0, transform=None):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (len(labels), 1, 8, 8), generator=g, dtype=torch.uint8)
        self.targets, self.transform = torch.as_tensor(labels), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return (x if self.transform is None else self.transform(x)), int(self.targets[i])


def test_rows_come_from_the_generation_path_with_per_neighbour_seeds(gen):
    ds = Items()
    bank = NeighbourBank(ds, gen, k=3, seed=5).build(batch_size=3, progress=False)   # one item per call
    model = load_generator(gen)
    for i in (0, 7):
        x = ds.images[i].float().div(255)[None].expand(3, -1, -1, -1)
        want = (generate(model, x, [neighbour_seed(5, i, r) for r in range(3)]) * 255).round().to(torch.uint8)
        assert all(torch.equal(bank.neighbour(i, r), want[r]) for r in range(3))
    assert len({bank.neighbour(0, r).numpy().tobytes() for r in range(3)}) == 3   # k distinct neighbours


def test_one_bank_serves_bank_augment_and_oversampling_on_two_dataset_objects(gen):
    """The README's pattern: BankAugment on one dataset object, the balanced set reading another
    without it. Reading the sources through BankAugment is refused with the fix in the message."""
    bank = NeighbourBank(Items(), gen, k=2).build(progress=False)
    aug = Items(transform=BankAugment(bank, p=1.0, seed=0))
    assert any(not torch.equal(aug[i][0], Items()[i][0]) for i in range(len(LABELS)))
    b = BalancedDKGMDataset(Items(), gen, progress=False, bank=bank).precompute(progress=False)
    assert len(b) == 18 and b[len(b) - 1][1] == 2
    with pytest.raises(DKGMError, match="BankAugment included, read the sources from a copy without it"):
        b = BalancedDKGMDataset(aug, gen, progress=False, bank=bank)
        [b[j] for j in range(len(LABELS), len(b))]


def test_seeds_do_not_depend_on_k_or_the_batch(gen):
    ds = Items()
    small = NeighbourBank(ds, gen, k=2).build(batch_size=256, progress=False)
    large = NeighbourBank(ds, gen, k=4).build(batch_size=4, progress=False)
    for i in range(len(ds)):
        for r in range(2):   # the same noise: at most one grey level of float rounding apart
            diff = (small.neighbour(i, r).int() - large.neighbour(i, r).int()).abs().max()
            assert diff <= 1, (i, r, diff)


def test_file_is_reopened_and_never_regenerated(gen, tmp_path, monkeypatch):
    path = tmp_path / "bank.safetensors"
    bank = NeighbourBank(Items(), gen, k=2, path=path)
    assert not bank.built
    bank.build(progress=False)
    monkeypatch.setattr(dkgm_aug.bank, "filtered_generate", lambda *a, **k: pytest.fail("regenerated"))
    again = NeighbourBank(Items(), gen, k=2, path=path)
    assert again.built and torch.equal(again.neighbour(9, 1), bank.neighbour(9, 1))
    with pytest.raises(DKGMError, match=r"differs in \['k'"):
        NeighbourBank(Items(), gen, k=3, path=path)
    with pytest.warns(UserWarning, match=r"made from other images than the dataset's \(row 0"):   # on reopening
        NeighbourBank(Items(seed=1), gen, k=2, path=path)
    changed = Items()
    changed.images[9] = 255 - changed.images[9]                      # one image changed: found when served
    with pytest.raises(DKGMError, match=r"was made from other images \(item 9"):
        other = NeighbourBank(changed, gen, k=2, path=path)
        b = BalancedDKGMDataset(changed, gen, progress=False, bank=other)
        b[len(b) - 1]


def test_damaged_file_is_rebuilt(gen, tmp_path):
    path = tmp_path / "bank.safetensors"
    good = NeighbourBank(Items(), gen, k=2, path=path).build(progress=False)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum"):
        bank = NeighbourBank(Items(), gen, k=2, path=path)
    assert not bank.built
    bank.build(progress=False)
    assert torch.equal(bank.neighbour(9, 1), good.neighbour(9, 1))


def test_bank_augment_types_p_and_seed(gen):
    ds = Items()
    bank = NeighbourBank(ds, gen, k=4).build(progress=False)
    rows = {bank.neighbour(3, r).numpy().tobytes() for r in range(4)}
    x = ds.images[3]
    assert BankAugment(bank, p=0.0, seed=0)(x) is x
    for kind, as_uint8 in (("uint8", lambda y: y), ("float", lambda y: (y * 255).round().to(torch.uint8)),
                           ("pil", lambda y: torch.from_numpy(np.array(y))[None])):
        inpt = {"uint8": x, "float": x.float() / 255, "pil": Image.fromarray(x[0].numpy())}[kind]
        out = BankAugment(bank, p=1.0, seed=0)(inpt)
        assert type(out) is type(inpt) and as_uint8(out).numpy().tobytes() in rows, kind
    draws = [BankAugment(bank, p=1.0, seed=s)(x) for s in range(12)]
    assert len({d.numpy().tobytes() for d in draws}) > 1                         # picks among the k
    assert torch.equal(BankAugment(bank, p=1.0, seed=3)(x), draws[3])             # seeded
    batch = BankAugment(bank, p=1.0, seed=0)(ds.images[:5])                       # a BCHW batch
    assert all(batch[i].numpy().tobytes() in {bank.neighbour(i, r).numpy().tobytes() for r in range(4)}
               for i in range(5))


def test_bank_augment_refuses_images_it_does_not_hold(gen):
    bank = NeighbourBank(Items(), gen, k=2).build(progress=False)
    flipped = Items().images[3].flip(-1)
    with pytest.raises(DataError, match="must come before any transform"):
        BankAugment(bank, p=0.0, seed=0)(flipped)                                 # at any p
    assert torch.equal(BankAugment(bank, p=1.0, missing="keep")(flipped), flipped)


def test_balanced_bank_changes_per_epoch_deterministically(gen):
    a = BalancedDKGMDataset(Items(), gen, progress=False, bank=3).precompute(progress=False)
    b = BalancedDKGMDataset(Items(), gen, progress=False, bank=3)
    synthetic = range(a.n_real, len(a))
    assert len(a.bank) == len(torch.unique(a._sources))       # one row per distinct source item

    def epoch(ds, e):
        ds.set_epoch(e)
        return [ds[i][0].numpy().tobytes() for i in synthetic]
    seen = [epoch(a, e) for e in range(4)]
    assert seen[0] == epoch(b, 0) and seen[2] == epoch(b, 2)                  # same seed and epoch: same items
    assert all(x != y for x, y in zip(seen[0], seen[1]))                       # another neighbour every epoch
    assert seen[3] == seen[0]                                                  # all k, then again
    for i, e0, e1, e2 in zip(synthetic, *seen[:3]):
        row = a.bank.row_of_index(a.source_index(i))
        assert {e0, e1, e2} == {a.bank.neighbour(row, r).numpy().tobytes() for r in range(3)}
        assert a[i][1] == a[a.source_index(i)][1]                              # the source's label
    other = BalancedDKGMDataset(Items(), gen, seed=1, progress=False, bank=3)
    other.set_epoch(0)
    assert [other[i][0].numpy().tobytes() for i in synthetic] != seen[0]


def test_balanced_takes_a_shared_bank_and_checks_it(gen):
    bank = NeighbourBank(Items(), gen, k=2).build(progress=False)
    b = BalancedDKGMDataset(Items(), gen, progress=False, bank=bank)
    i = len(b) - 1
    assert b[i][0].numpy().tobytes() in {bank.neighbour(b.source_index(i), r).numpy().tobytes() for r in range(2)}
    with pytest.raises(DKGMError, match="another alpha"):
        BalancedDKGMDataset(Items(), gen, alpha=0.9, progress=False, bank=bank)
    part = NeighbourBank(Items(), gen, k=2, indices=[0, 1]).build(progress=False)
    with pytest.raises(DKGMError, match="holds no neighbours of"):
        BalancedDKGMDataset(Items(), gen, progress=False, bank=part)


def _counting(calls):
    def wrap(fn):
        def counted(*args, **kwargs):
            with calls.get_lock():
                calls.value += 1
            return fn(*args, **kwargs)
        return counted
    return wrap


@pytest.mark.parametrize("use", ["transform", "balanced"])
def test_dataloader_workers_share_the_bank_and_never_generate(use, gen, tmp_path, monkeypatch):
    calls = multiprocessing.get_context("fork").Value("i", 0)
    for module in (dkgm_aug.bank, dkgm_aug.balanced):
        monkeypatch.setattr(module, "filtered_generate", _counting(calls)(module.filtered_generate))
    if use == "transform":
        bank = NeighbourBank(Items(), gen, k=32, path=tmp_path / "b.safetensors").build(progress=False)
        ds = Items(transform=BankAugment(bank, p=1.0, seed=0))
    else:
        ds = BalancedDKGMDataset(Items(), gen, cache=tmp_path / "b.safetensors", progress=False, bank=32)
        bank = ds.precompute(progress=False).bank
    built = calls.value
    assert built > 0 and len(pickle.dumps(bank)) < len(bank) * 32 * 64 // 2   # workers get a path, not the images
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork",
                                         persistent_workers=True)
    epochs = []
    for e in range(2):
        if use == "balanced":
            ds.set_epoch(e)                       # reaches the persistent workers
        epochs.append(torch.cat([x for x, _ in loader]))
    assert calls.value == built                   # nothing generated in the workers, in any epoch
    held = {bank.neighbour(r, n).numpy().tobytes() for r in range(len(bank)) for n in range(32)}
    first = 0 if use == "transform" else ds.n_real
    assert all(x.numpy().tobytes() in held for x in epochs[0][first:])
    if use == "balanced":
        assert torch.equal(epochs[0][:first], epochs[1][:first])            # real items unchanged
        assert all(not torch.equal(x, y) for x, y in zip(epochs[0][first:], epochs[1][first:]))
        ds.set_epoch(1)
        assert torch.equal(epochs[1][first:], torch.stack([ds[i][0] for i in range(first, len(ds))]))


def test_worker_refuses_to_build():
    bank = NeighbourBank(Items(), micro_model(image_size=8), k=2)
    loader = torch.utils.data.DataLoader(Items(transform=BankAugment(bank, p=1.0)), batch_size=4, num_workers=1,
                                         multiprocessing_context="fork")
    with pytest.raises(DKGMError, match="before creating the DataLoader"):
        next(iter(loader))


def test_balanced_bank_reports_its_neighbours_and_refuses_the_cache_calls(gen, tmp_path):
    """Bank mode keeps its images in the bank: n_generated counts them (it said 0), and
    save_cache/load_cache, which serve the non-bank mode, say so instead of failing misleadingly
    or loading images that would never be shown."""
    b = BalancedDKGMDataset(Items(), gen, progress=False, bank=3)
    assert b.n_generated == 0
    b.precompute(progress=False)
    assert b.n_generated == len(b.bank) * 3 > 0
    for call in (b.save_cache, b.load_cache):
        with pytest.raises(DKGMError, match="bank"):
            call(tmp_path / "c.safetensors")


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2 ** 31))
def test_batch_digests_are_the_per_image_digests_files_hold(b, c, h, w, seed):
    """Banks and caches on disk hold these digests: the batched form must give the per-image
    bytes exactly (shape of one image, then its 256-level pixels, blake2b-16)."""
    import hashlib

    from dkgm_aug import cache
    x = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))
    q = (x * 255).round().to(torch.uint8)
    want = [hashlib.blake2b(repr((c, h, w)).encode() + q[i].numpy().tobytes(), digest_size=16).digest()
            for i in range(b)]
    assert cache.batch_digests(x) == want and [cache.digest(xi) for xi in x] == want


def _conditional_generator(num_classes=4):
    from dkgm_aug import DKGM
    torch.manual_seed(0)
    model = DKGM.from_preset("tiny", image_size=8, channels=1, num_classes=num_classes, steps=1)
    with torch.no_grad():                      # weights away from the silent start, so labels change outputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_a_bank_whose_rows_depend_on_labels_is_another_bank_for_other_labels(tmp_path):
    """With a class-conditional generator (or a label filter) the rows depend on the sources' labels:
    the same images relabelled are refused on reopening (they used to be served the old class's
    neighbours), while an unconditional bank's fingerprint holds no labels."""
    model = _conditional_generator()
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(1, 8, 8, generator=g) * 255).to(torch.uint8) for _ in range(6)]
    a = [(im, y) for im, y in zip(images, [0, 0, 0, 1, 1, 1])]
    b = [(im, y) for im, y in zip(images, [2, 2, 2, 3, 3, 3])]
    path = tmp_path / "bank.safetensors"
    NeighbourBank(a, model, k=2, path=path).build(progress=False)
    assert NeighbourBank(a, model, k=2, path=path).built
    with pytest.raises(DKGMError, match="labels_sha256"):
        NeighbourBank(b, model, k=2, path=path)
    assert not torch.equal(NeighbourBank(a, model, k=2).build(progress=False).neighbour(0, 0),
                           NeighbourBank(b, model, k=2).build(progress=False).neighbour(0, 0))
    assert "labels_sha256" not in NeighbourBank(a, micro_model(), k=2).fingerprint()


def test_balanced_bank_generates_with_the_labels_given_to_the_dataset():
    """BalancedDKGMDataset(labels=..., bank=k) makes its neighbours with the labels it was given (as
    its on-demand path does), not with the items' own; a shared bank made with other labels is refused."""
    model = _conditional_generator()
    g = torch.Generator().manual_seed(1)
    images = [(torch.rand(1, 8, 8, generator=g) * 255).to(torch.uint8) for _ in range(6)]
    items = [(im, y) for im, y in zip(images, [1, 1, 1, 1, 2, 2])]     # raw labels stored in the items
    given = [0, 0, 0, 0, 3, 3]                                          # the class indices passed
    ds = BalancedDKGMDataset(items, model, labels=given, bank=1, cache=None, progress=False).precompute(progress=False)
    j = ds.n_real                                                       # the first synthetic item
    source = ds.source_index(j)
    x = images[source][None].float() / 255 * 2 - 1
    want = model.neighbours_from_seeds(x, [neighbour_seed(0, source, 0)], labels=[given[source]])
    assert torch.equal(ds[j][0], ((want[0] + 1) / 2 * 255).round().to(torch.uint8))
    own = NeighbourBank(items, model, k=1).build(progress=False)        # made with the items' labels
    with pytest.raises(DKGMError, match="other labels"):
        BalancedDKGMDataset(items, model, labels=given, bank=own, cache=None, progress=False)


def test_reopening_a_label_dependent_bank_reads_stored_labels_not_every_image(tmp_path):
    """The label fingerprint of a conditional bank comes from the dataset's stored labels when they
    are the items' own: reopening it loads a few spread items (16 at most), not the whole dataset."""
    model = _conditional_generator()

    class Counted(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(2)
            self.images = (torch.rand(12, 1, 8, 8, generator=g) * 255).to(torch.uint8)
            self.targets = [0] * 6 + [1] * 3 + [2] * 3
            self.reads = 0

        def __len__(self):
            return 12

        def __getitem__(self, i):
            self.reads += 1
            return self.images[i], self.targets[i]
    ds = Counted()
    NeighbourBank(ds, model, k=1, path=tmp_path / "bank.safetensors").build(progress=False)
    ds.reads = 0
    assert NeighbourBank(ds, model, k=1, path=tmp_path / "bank.safetensors").built and ds.reads <= 16


def test_opening_a_bank_from_a_checkpoint_path_does_not_load_the_generator(tmp_path, monkeypatch):
    """Whether the rows depend on labels is read from the checkpoint's config: reopening a built bank
    loads no model (the label fingerprint loaded, and could compile, the generator every time)."""
    model = _conditional_generator()
    model.save(tmp_path / "g.safetensors")
    g = torch.Generator().manual_seed(3)
    items = [((torch.rand(1, 8, 8, generator=g) * 255).to(torch.uint8), y) for y in [0, 0, 1, 2]]
    NeighbourBank(items, str(tmp_path / "g.safetensors"), k=1, path=tmp_path / "b.safetensors").build(progress=False)
    monkeypatch.setattr(dkgm_aug.bank, "load_generator", lambda *a, **k: pytest.fail("loaded the generator"))
    again = NeighbourBank(items, str(tmp_path / "g.safetensors"), k=1, path=tmp_path / "b.safetensors")
    assert again.built and "labels_sha256" in again.fingerprint()


def test_bank_augment_serves_the_row_of_the_sample_label_when_rows_depend_on_labels():
    """A class-conditional bank holds identical images under different labels as different rows:
    BankAugment picks the row of the sample's label (it served the first row's class to both),
    refuses to guess without a label, and refuses a label the bank did not make the image's
    neighbours with (data relabelled after the bank was made: the old class's neighbours, silently)."""
    model = _conditional_generator()
    g = torch.Generator().manual_seed(4)
    twin, other = ((torch.rand(1, 8, 8, generator=g) * 255).to(torch.uint8) for _ in range(2))
    bank = NeighbourBank([(twin, 0), (twin, 2), (other, 1)], model, k=1).build(progress=False)
    aug = lambda: BankAugment(bank, p=1.0, seed=0)                       # noqa: E731
    want = lambda row: bank.neighbour(row, 0)                            # noqa: E731 (k=1: the only one)
    assert not torch.equal(want(0), want(1))                            # the two classes' neighbours differ
    assert torch.equal(aug()(twin, 2)[0], want(1)) and torch.equal(aug()(twin, 0)[0], want(0))
    assert torch.equal(aug()({"image": twin, "label": torch.tensor(2)})["image"], want(1))
    x, y = aug()(torch.stack([twin, twin, other]), torch.tensor([2, 0, 1]))
    assert torch.equal(x[0], want(1)) and torch.equal(x[1], want(0)) and torch.equal(x[2], want(2))
    with pytest.raises(DataError, match="several classes"):
        aug()(twin)
    assert torch.equal(aug()(other), want(2))                          # one class: no label needed
    with pytest.raises(DataError, match="relabelled"):
        aug()(other, 3)
    with pytest.raises(DataError, match="relabelled"):
        BankAugment(bank, p=0.0)(other, 3)                               # checked at any p
    plain = NeighbourBank([(twin, 0), (twin, 2), (other, 1)], micro_model(), k=1).build(progress=False)
    assert torch.equal(BankAugment(plain, p=0.0)(other, 3)[0], other)   # an unconditional bank ignores labels


def test_bank_augment_reads_only_labels_a_sample_names_plainly():
    """The label check of a label-dependent bank must not refuse samples it cannot read a class
    from: list labels of a batch count, an index beside the label, a float weight or a dict without
    a label key are no label, and a bank whose rows have no label (a filter over bare images)
    checks nothing."""
    model = _conditional_generator()
    g = torch.Generator().manual_seed(5)
    images = [(torch.rand(1, 8, 8, generator=g) * 255).to(torch.uint8) for _ in range(3)]
    bank = NeighbourBank(list(zip(images, [0, 1, 2])), model, k=1).build(progress=False)
    aug = BankAugment(bank, p=1.0, seed=0)
    x = torch.stack(images)
    assert torch.equal(aug(x, [0, 1, 2])[0], torch.stack([bank.neighbour(r, 0) for r in range(3)]))
    with pytest.raises(DataError, match="relabelled"):
        aug(x, [0, 1, 3])                                           # a list of labels is read, one per image
    for sample in ((images[1], 7, 1), (images[1], 0.5), {"image": images[1], "index": 0}):
        out = aug(*sample) if isinstance(sample, tuple) else aug(sample)
        first = out["image"] if isinstance(out, dict) else out[0]
        assert torch.equal(first, bank.neighbour(1, 0))           # no class read: the image's one row
    from dkgm_aug import LabelFilter

    class Dark(torch.nn.Module):
        def forward(self, x):
            return torch.stack([1 - x.mean((1, 2, 3)), x.mean((1, 2, 3))], 1)
    bare = NeighbourBank(images, micro_model(image_size=8), k=1, label_filter=LabelFilter(Dark())).build(progress=False)
    assert bare.row_labels() == [None, None, None]
    assert BankAugment(bare, p=0.0)(images[0], 1)[0].shape == images[0].shape


@pytest.mark.parametrize("k", [2, 3, 8])
def test_balanced_bank_never_serves_one_neighbour_twice_for_one_source_while_k_allows(gen, k):
    """Synthetic item j showed neighbour (h(seed, j) + epoch) % k: items of one source collided at
    random (3 copies of a source with k=8: a third of the sources served one neighbour twice) and, all
    moving by one each epoch, the same ones collided every epoch. Now a source's m items show m
    different neighbours when m <= k (each neighbour ceil/floor of m / k times when m > k), another
    m each epoch, and all k within ceil(k / m) epochs."""
    labels = [0] * 20 + [1] * 5 + [2] * 2          # class 1: 3 items a source, class 2: 9 or 10
    ds = BalancedDKGMDataset(Items(labels), gen, progress=False, bank=k).precompute(progress=False)
    for epoch in range(3):
        ds.set_epoch(epoch)
        shown = {}
        for i in range(ds.n_real, len(ds)):
            shown.setdefault(ds.source_index(i), []).append(ds[i][0].numpy().tobytes())
        for source, images in shown.items():
            counts = sorted(map(images.count, set(images)))
            m = len(images)
            assert len(set(images)) == min(m, k) and counts[-1] - counts[0] <= 1, (source, m, counts)
    covered = {}
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(ds.n_real, len(ds)):
            covered.setdefault(ds.source_index(i), set()).add(ds[i][0].numpy().tobytes())
    assert all(len(v) == k for v in covered.values())   # ceil(k / 3) <= 3 epochs for every source here


def test_an_unlabelled_item_does_not_strip_the_labels_of_the_rows_built_beside_it():
    """make_rows dropped the labels of a whole generator call when one of its items had none: with a
    per-class kernel-smoothed score, the labelled rows in that call got whole-set neighbours, so a
    row depended on build(batch_size=...) (the docstring: "depends on nothing but the rows")."""
    from dkgm_aug import KernelSmoothedScore
    x = torch.randint(0, 256, (12, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    y = [i % 2 for i in range(12)]
    kss = KernelSmoothedScore(x, y, h=0.5, steps=8, alpha=1.0)
    items = [{"image": x[i], "label": y[i]} for i in range(12)] + [{"image": torch.zeros(1, 8, 8, dtype=torch.uint8),
                                                                     "label": None}]
    small, whole = (NeighbourBank(items, kss, k=2).build(batch_size=bs, progress=False) for bs in (2, 256))
    assert all(torch.equal(small.neighbour(i, r), whole.neighbour(i, r)) for i in range(13) for r in range(2))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.lists(st.integers(0, 20), min_size=4, max_size=4),
       st.integers(0, 2 ** 31))
def test_plan_siblings_matches_the_index_plan(counts, n_new, seed):
    """plan_siblings works out each synthetic item's rank among its source's items, and their number,
    from index_plan's layout alone; checked against counting the plan's sources."""
    from dkgm_aug.sampling import index_plan, plan_siblings
    n_new = n_new[:len(counts)]
    real = torch.cat([torch.full((n,), c, dtype=torch.int32) for c, n in enumerate(counts)])
    codes, sources = index_plan(real, n_new, seed)
    j = np.arange(len(sources))
    rank, siblings = plan_siblings(j, codes[len(real):].numpy(), counts, n_new)
    src = sources.tolist()
    assert rank.tolist() == [src[:i].count(s) for i, s in enumerate(src)]
    assert siblings.tolist() == [src.count(s) for s in src]
