"""BalancedDKGMDataset refuses what would give silently wrong results (issue 12): cache files made
from other pixels or plans, unusable cache paths, NaN labels, bad seeds and devices; and it takes
dict items, extra tuple fields, ``labels=``, Subset/ConcatDataset labels and class names."""
import collections
import fcntl
import multiprocessing
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from test_balanced import LABELS, Images

import dkgm_aug.cache as cache_file
from dkgm_aug import CheckpointError, DataError, DKGMError
from dkgm_aug.balanced import BalancedDKGMDataset
from dkgm_aug.sampling import read_labels



def inverted(ds: Images, only=None) -> Images:
    """``ds`` with its images inverted (all of them, or item ``only``): same labels, other pixels."""
    ds.items = [255 - x if only in (None, k) else x for k, x in enumerate(ds.items)]
    return ds


@pytest.fixture
def cached(gen, tmp_path):
    path = tmp_path / "synth.safetensors"
    made = BalancedDKGMDataset(Images(), gen, cache=path, progress=False).precompute(progress=False)
    return path, made


# -- case 1: the cache file remembers its source images ------------------------------------------
def test_cache_made_from_other_pixels_is_refused(gen, cached):
    path, made = cached
    with pytest.raises(DKGMError, match=r"made from other images \(source item \d+ differs\); delete it"):
        BalancedDKGMDataset(inverted(Images()), gen, cache=path, progress=False)


def test_cache_of_the_same_pixels_loads_without_generating(gen, cached):
    path, made = cached
    b = BalancedDKGMDataset(Images(), gen, cache=path, progress=False)
    assert all(torch.equal(b[i][0], made[i][0]) for i in range(len(b)))
    assert b._model is None and bool(b._checked.all())   # served from the file, every source checked


def test_one_changed_source_is_caught_when_served(gen, cached):
    path, made = cached
    probe = BalancedDKGMDataset(Images(), gen, progress=False)
    first = probe.source_index(probe.n_real)
    other = next(probe.source_index(i) for i in range(probe.n_real, len(probe)) if probe.source_index(i) != first)
    b = BalancedDKGMDataset(inverted(Images(), only=other), gen, cache=path, progress=False)
    served = [i for i in range(b.n_real, len(b)) if b.source_index(i) != other]
    assert all(torch.equal(b[i][0], made[i][0]) for i in served)
    bad = next(i for i in range(b.n_real, len(b)) if b.source_index(i) == other)
    with pytest.raises(DKGMError, match=rf"source item {other} differs"):
        b[bad]


# -- cases 2 and 3: cache paths checked at construction -------------------------------------------
def _build_exit_code(gen, fifo):
    try:
        BalancedDKGMDataset(Images(), gen, cache=fifo, progress=False)
    except DKGMError as exc:
        os._exit(0 if "is a FIFO, not a regular file" in str(exc) else 2)
    os._exit(1)


def test_fifo_cache_path_is_refused_at_once(gen, tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    # In a child process: opening a FIFO blocks inside safetensors with the GIL held, so a
    # thread could not time it out.
    child = multiprocessing.get_context("fork").Process(target=_build_exit_code, args=(gen, fifo))
    child.start()
    child.join(5)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("BalancedDKGMDataset blocked on a FIFO cache path")
    assert child.exitcode == 0, "no DKGMError naming the FIFO"


def test_folder_cache_path_is_refused(gen, tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(DKGMError, match="is a folder, not a regular file"):
        BalancedDKGMDataset(Images(), gen, cache=tmp_path / "d.safetensors", progress=False)


def test_unwritable_cache_folder_is_refused_before_generating(gen, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(DKGMError, match="is not a folder"):
        BalancedDKGMDataset(Images(), gen, cache=tmp_path / "file" / "sub" / "c.safetensors", progress=False)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)   # root writes anywhere: pretend read-only
    with pytest.raises(DKGMError, match="not writable"):
        BalancedDKGMDataset(Images(), gen, cache=tmp_path / "new" / "c.safetensors", progress=False)


def test_complete_cache_in_a_read_only_folder_is_used(gen, cached, monkeypatch):
    path, made = cached
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    b = BalancedDKGMDataset(Images(), gen, cache=path, progress=False).precompute(progress=False)
    assert torch.equal(b[len(b) - 1][0], made[len(made) - 1][0])   # nothing to write, nothing refused


# -- case 4: two writers, one file ----------------------------------------------------------------
def test_second_writer_of_another_plan_is_refused(gen, tmp_path):
    path = tmp_path / "shared.safetensors"
    a = BalancedDKGMDataset(Images(), gen, cache=path, seed=0, progress=False)
    b = BalancedDKGMDataset(Images(), gen, cache=path, seed=1, progress=False)
    same = BalancedDKGMDataset(Images(), gen, cache=path, seed=0, progress=False)
    a.precompute(progress=False)
    with pytest.raises(DKGMError, match="another dataset plan or other source images.*its own cache path"):
        b.precompute(progress=False)
    same.precompute(progress=False)   # the same plan and pixels: rewriting it loses nothing
    assert len(BalancedDKGMDataset(Images(), gen, cache=path, progress=False)._cache) == a.n_synthetic


def test_cache_is_written_under_a_lock(gen, tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    real_save = cache_file.save_file
    held = []

    def save_file(*args, **kwargs):
        with open(tmp_path / ".c.safetensors.lock") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(True)
        real_save(*args, **kwargs)
    monkeypatch.setattr(cache_file, "save_file", save_file)
    BalancedDKGMDataset(Images(), gen, cache=path, progress=False).precompute(progress=False)
    assert held == [True] and path.is_file()


# -- case 12: write errors name the cache file --------------------------------------------------------
def test_disk_full_names_the_cache_file(gen, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, message: \"No space left on device\" })")
    monkeypatch.setattr(cache_file, "save_file", full)
    path = tmp_path / "c.safetensors"
    with pytest.raises(CheckpointError, match=f"could not write cache file {path}.*No space left"):
        BalancedDKGMDataset(Images(), gen, cache=path, progress=False).precompute(progress=False)
    assert not path.exists()


def test_save_under_a_file_names_the_cache_file(gen, tmp_path):
    (tmp_path / "file").write_text("")
    b = BalancedDKGMDataset(Images(), gen, progress=False).precompute(progress=False)
    with pytest.raises(CheckpointError, match="c.safetensors"):
        b.save_cache(tmp_path / "file" / "c.safetensors")


# -- cases 5, 6, 7: labels ----------------------------------------------------------------------------
def test_nan_labels_are_refused(gen):
    nan = float("nan")
    with pytest.raises(DataError, match="NaN labels on 5 of 15 items"):
        BalancedDKGMDataset(Images([0.0] * 5 + [1.0] * 5 + [nan] * 5, expose=False), gen, progress=False)
    with pytest.raises(DataError, match=r"NaN labels on 1 of 3 items \(the first: item 1\)"):
        BalancedDKGMDataset(Images([0.0, 1.0, 1.0]), gen, labels=torch.tensor([0.0, nan, 1.0]), progress=False)


def test_labels_argument_reads_no_item(gen):
    ds = Images(expose=False)
    b = BalancedDKGMDataset(ds, gen, labels=np.asarray(LABELS), progress=False)
    assert ds.calls == 0 and b.class_counts_before == {0: 6, 1: 3, 2: 1}
    with pytest.raises(DataError, match="10 items but labels= has shape"):
        BalancedDKGMDataset(ds, gen, labels=LABELS[:4], progress=False)


def test_subset_and_concat_labels_read_no_item(gen):
    base = Images()
    sub = torch.utils.data.Subset(base, [0, 1, 2, 6, 7, 9])
    both = torch.utils.data.ConcatDataset([sub, torch.utils.data.Subset(Images(seed=1), torch.arange(10))])
    b = BalancedDKGMDataset(torch.utils.data.Subset(both, list(range(2, 16))), gen, progress=False)
    assert base.calls <= 16       # stored labels, checked against 16 spread items, no pass
    labels = [both[i][1] for i in range(2, 16)]
    assert b.targets[:b.n_real] == labels and b.class_counts_before == {c: labels.count(c) for c in (0, 1, 2)}


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(0, 4), min_size=1, max_size=12), data=st.data())
def test_subset_labels_equal_a_pass_over_items(labels, data):
    indices = data.draw(st.lists(st.integers(0, len(labels) - 1), min_size=1, max_size=12))
    sub = torch.utils.data.Subset(Images(labels), indices)
    values, codes = read_labels(sub, progress=False)
    assert [values[k] for k in codes.tolist()] == [labels[i] for i in indices]


class Named(Images):
    classes = ["T-shirt", "trouser", "pullover", "dress"]


def test_classes_are_names_when_labels_index_them(gen):
    b = BalancedDKGMDataset(Named(), gen, progress=False)
    assert b.classes == Named.classes and b.class_values == [0, 1, 2]
    assert set(b.class_counts) == {0, 1, 2} and b.targets[-1] == 2 and b[len(b) - 1][1] == 2
    assert BalancedDKGMDataset(torch.utils.data.Subset(Named(), range(10)), gen, progress=False).classes == Named.classes
    assert BalancedDKGMDataset(Images(), gen, progress=False).classes == [0, 1, 2]   # no names: the values
    strings = Named(["a", "b", "b"])
    assert BalancedDKGMDataset(strings, gen, progress=False).classes == ["a", "b"]   # not indices


# -- cases 8, 9: item layouts --------------------------------------------------------------------------
class Dicts(Images):
    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return {"img": image, "y": label, "id": i}


def test_dict_items(gen):
    b = BalancedDKGMDataset(Dicts(expose=False), gen, image_key="img", label_key="y", progress=False)
    last = b[len(b) - 1]
    assert set(last) == {"img", "y", "id"} and last["y"] == 2 and last["id"] == b.source_index(len(b) - 1)
    assert last["img"].shape == (1, 8, 8)
    batch = next(iter(torch.utils.data.DataLoader(b, batch_size=len(b))))
    assert batch["img"].shape == (len(b), 1, 8, 8) and batch["y"].tolist() == b.targets
    # the default keys: refused at construction (its labels are checked against three items) or at the item
    with pytest.raises(DataError, match=r"without the key '(image|label)'.*(image|label)_key="):
        BalancedDKGMDataset(Dicts(), gen, progress=False)[len(b) - 1]


class Triples(Images):
    def __getitem__(self, i):
        return (*super().__getitem__(i), f"file{i}.png")


def test_extra_tuple_fields_are_kept(gen):
    b = BalancedDKGMDataset(Triples(), gen, progress=False)
    assert len(b[len(b) - 1]) == 3 and b[len(b) - 1][2] == f"file{b.source_index(len(b) - 1)}.png"
    images, labels, names = next(iter(torch.utils.data.DataLoader(b, batch_size=len(b))))
    assert images.shape == (len(b), 1, 8, 8) and len(names) == len(b)


# -- case 10: seed and device ---------------------------------------------------------------------------
def test_seed_and_device_are_checked_at_construction(gen):
    with pytest.raises(DKGMError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        BalancedDKGMDataset(Images(), gen, seed=2 ** 70, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(DKGMError, match="CUDA is not available"):
            BalancedDKGMDataset(Images(), gen, device="cuda", progress=False)


# -- case 11: generating in DataLoader workers ---------------------------------------------------------
def warnings_as_errors(_):
    warnings.simplefilter("error", UserWarning)   # the worker's warning comes back as its error


def test_generating_in_workers_warns(gen):
    b = BalancedDKGMDataset(Images(), gen, progress=False)
    loader = torch.utils.data.DataLoader(b, batch_size=4, num_workers=2, multiprocessing_context="fork",
                                         worker_init_fn=warnings_as_errors)
    with pytest.raises(UserWarning, match="generating synthetic images in a DataLoader worker.*precompute()"):
        list(loader)
    b.precompute(progress=False)
    assert len(list(loader)) == -(-len(b) // 4)   # precomputed: the workers only read


def test_worker_warning_is_given_once(gen, monkeypatch):
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    b = BalancedDKGMDataset(Images(), gen, progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        b[len(b) - 1], b[len(b) - 2]
    assert len(seen) == 1 and "precompute()" in str(seen[0].message)


def test_cache_with_a_model_object_as_generator(tmp_path):
    """The fingerprint of a model object (not a checkpoint path) hashes its weights: this crashed
    with a numpy ufunc error before (bytes + array)."""
    from conftest import micro_model
    from dkgm_aug.data import ImageDataset
    ds = ImageDataset(torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8), [0, 0, 0, 0, 1, 1])
    torch.manual_seed(0)
    model = micro_model(image_size=8)
    cache = tmp_path / "c.safetensors"
    first = BalancedDKGMDataset(ds, model, cache=cache, progress=False).precompute(progress=False)
    again = BalancedDKGMDataset(ds, model, cache=cache, progress=False)
    assert len(again._cache) == first.n_synthetic and torch.equal(again[6][0], first[6][0])


def test_a_dataset_folder_with_classes_merged_in_samples_is_balanced_by_its_items_labels(tmp_path):
    """torchvision's DatasetFolder reads its items' labels from ``.samples``; merging classes there
    (a common recipe) leaves ``.targets`` stale. The stored labels were trusted after three items
    agreed, so the counts and the balancing followed the stale labels (a class that no longer exists
    got synthetic items). A DatasetFolder's ``.samples`` is what its items read, and is read first;
    any other dataset's ``samples`` attribute is not taken for labels."""
    from PIL import Image
    from torchvision.datasets import ImageFolder
    sizes = {"a": 40, "b": 10, "c": 50}
    g = np.random.default_rng(0)
    for name, n in sizes.items():
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(g.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / name / f"{i:03d}.png")
    folder = ImageFolder(tmp_path, transform=lambda im: torch.from_numpy(np.asarray(im.convert("L")).copy())[None])
    merge = {0: 0, 1: 0, 2: 2}                        # b (class 1, items 40-49) merged into a
    folder.samples = [(p, merge[y]) for p, y in folder.samples]
    folder.samples[5] = (folder.samples[5][0], 2)     # one image of a relabelled by hand
    ds = BalancedDKGMDataset(folder, "fashion-mnist-tiny", progress=False, cache=None)
    assert ds.class_counts_before == {0: 49, 2: 51}   # no class 1 is left to fill
    assert ds.class_counts == {0: 51, 2: 51}

    class Annotated(torch.utils.data.Dataset):       # a samples list that holds no labels
        def __init__(self):
            self.images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
            self.targets = [0, 0, 0, 1]
            self.samples = [("x.png", None)] * 4

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return self.images[i], self.targets[i]
    assert BalancedDKGMDataset(Annotated(), "fashion-mnist-tiny", progress=False).class_counts_before == {0: 3, 1: 1}


def test_a_small_class_relabelled_in_getitem_is_found_by_a_check_of_each_class(gen):
    """Stored ``.targets`` were trusted after 16 evenly spaced items agreed, so a small class that
    ``__getitem__`` merges into another (none of the 16 landed on it) got synthetic items served
    under the other class's label: that class ended with twice its share. One item of each stored
    class is checked too; and a synthetic item whose source now reads another label is refused."""
    from dkgm_aug.data import ImageDataset
    counts = [200, 200, 20, 200, 200]                 # class-sorted; class 2 falls between the checks
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])

    class Merged(ImageDataset):
        merge = {2: 1}

        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x, self.merge.get(int(y), int(y))
    ds = Merged(torch.randint(0, 256, (len(targets), 1, 8, 8), dtype=torch.uint8), targets)
    bal = BalancedDKGMDataset(ds, gen, progress=False, cache=None)
    assert bal.class_counts_before == {0: 200, 1: 220, 3: 200, 4: 200}
    served = [bal[i][1] for i in range(bal.n_real, len(bal))]
    assert sorted(collections.Counter(served).items()) == [(0, 20), (3, 20), (4, 20)]

    Merged.merge = {}                                 # labels as stored now: planned from them
    bal = BalancedDKGMDataset(ds, gen, progress=False, cache=None)
    Merged.merge = {2: 1}                             # and changed after planning
    j = next(i for i in range(bal.n_real, len(bal)) if bal.targets[i] == 2)
    with pytest.raises(DataError, match="reads label 1, but the classes were balanced with it in class 2"):
        bal[j]


class RandomlyFlipped(Images):
    """A base dataset with a random transform on it (a flip drawn from torch's RNG at each read)."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return (x.flip(-1) if bool(torch.rand(()) < 0.5) else x.flip(-2)), y


def test_a_random_transform_on_the_base_dataset_warns_before_neighbours_are_kept(gen):
    """In memory (the default cache) a synthetic item was made once from one random view of its
    source and kept for every epoch, while real items changed on every read, with no word (a cache
    file or a bank refuse the same data when they reopen). Warned now; a plain dataset is not."""
    ds = BalancedDKGMDataset(RandomlyFlipped(), gen, progress=False)
    with pytest.warns(UserWarning, match="served two different images.*move random transforms"):
        ds[len(ds) - 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BalancedDKGMDataset(Images(), gen, progress=False).precompute(progress=False)
        nothing_kept = BalancedDKGMDataset(RandomlyFlipped(), gen, progress=False, cache=None)
        nothing_kept[len(nothing_kept) - 1]                      # a fresh view's neighbour at every read: right
    with pytest.warns(UserWarning, match="served two different images"):
        BalancedDKGMDataset(RandomlyFlipped(), gen, progress=False, cache=None).precompute(progress=False)


def test_shards_written_from_a_randomly_transformed_base_dataset_warn_too(gen, tmp_path):
    from dkgm_aug.precompute import precompute
    with pytest.warns(UserWarning, match="served two different images"):
        precompute(RandomlyFlipped(), gen, tmp_path / "s", shard_size=64, progress=False)


class Relabelled(Images):
    """Label cleaning in __getitem__ that leaves .targets stale: items 5, 12, 30 (class 0, away from
    the spot checks) read class 1."""

    def __init__(self):
        super().__init__(labels=[0] * 40 + [1] * 10 + [2] * 5)

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, (1 if i in (5, 12, 30) else y)


def test_a_real_item_whose_label_differs_from_the_stored_one_is_refused_when_served(gen):
    """.targets is trusted after spot checks: items relabelled in __getitem__ away from the checked
    positions unbalanced the classes with no word (the plan counted them in their stored class)."""
    ds = Relabelled()
    b = BalancedDKGMDataset(ds, gen, progress=False)
    assert b.class_counts_before == {0: 40, 1: 10, 2: 5}                 # the stored labels were trusted
    with pytest.raises(DataError, match="item 5 reads label 1, but the classes were balanced with it in class 0"):
        [b[i] for i in range(b.n_real)]
    b = BalancedDKGMDataset(ds, gen, progress=False, labels=[ds[i][1] for i in range(len(ds))])
    assert b.class_counts_before == {0: 37, 1: 13, 2: 5} and [b[i][1] for i in (5, 12, 30)] == [1, 1, 1]
