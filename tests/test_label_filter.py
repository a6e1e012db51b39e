"""LabelFilter: rejected neighbours are redrawn with the next seed, deterministically."""
import pytest
import torch
from torch import nn

from dkgm_aug import DataError, DKGMAugment, DKGMError, LabelFilter, list_evaluators
from dkgm_aug.augment import filtered_generate
from dkgm_aug.label_filter import retry_seed


class Inverter(nn.Module):
    """A fake generator: image i comes back inverted when its seed is divisible by 3, else as is."""
    channels = 1

    def __init__(self):
        super().__init__()
        self.calls = 0

    def neighbours_from_seeds(self, x, seeds, *, labels=None, alpha=None, steps=None):
        self.calls += 1
        flip = torch.tensor([s % 3 == 0 for s in seeds])[:, None, None, None]
        return torch.where(flip, -x, x)          # model range [-1, 1]: -x is the inverted image


class Bright(nn.Module):
    """A fake classifier: class 1 when the mean pixel is above 0.5, else class 0."""

    def __init__(self, always=None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.always = always

    def forward(self, x01):
        bright = (x01.flatten(1).mean(1) > 0.5).long()
        if self.always is not None:
            bright = torch.full_like(bright, self.always)
        return nn.functional.one_hot(bright, 2).float() + 0 * self.w


def images(n=6):
    x = torch.full((n, 1, 4, 4), 0.2)
    x[::2] = 0.9                                  # alternate dark and bright sources
    return x


def test_rejected_neighbours_are_redrawn_until_they_keep_the_class():
    x, seeds = images(), [0, 1, 3, 4, 6, 7]       # 0, 3, 6 invert (change class) on the first try
    f = LabelFilter(Bright(), max_tries=4)
    out = filtered_generate(Inverter(), x, seeds, label_filter=f)
    assert torch.equal(Bright()(out).argmax(1), Bright()(x).argmax(1))
    assert sum(f.rejected.values()) >= 3 and sum(f.drawn.values()) == 6 + sum(f.rejected.values())
    assert set(f.rejection_rate) <= {0, 1} and f.exhausted == {}
    # without the filter, the inverted ones come back in the other class
    plain = filtered_generate(Inverter(), x, seeds)
    assert (Bright()(plain).argmax(1) != Bright()(x).argmax(1)).sum() == 3


def test_result_does_not_depend_on_the_batch():
    x, seeds = images(), [0, 1, 3, 4, 6, 9]
    f = LabelFilter(Bright())
    whole = filtered_generate(Inverter(), x, seeds, label_filter=f)
    parts = torch.cat([filtered_generate(Inverter(), x[i:i + 2], seeds[i:i + 2], label_filter=f) for i in (0, 2, 4)])
    assert torch.equal(whole, parts)


def test_retry_seeds_are_distinct_and_in_range():
    seeds = {retry_seed(s, k) for s in (0, 1, 2 ** 63 - 1) for k in range(8)}
    assert len(seeds) == 24 and all(0 <= s < 2 ** 63 for s in seeds)


@pytest.mark.parametrize("on_exhausted", ["source", "keep"])
def test_when_tries_run_out(on_exhausted):
    x = images(2)
    f = LabelFilter(Bright(always=1), max_tries=3, on_exhausted=on_exhausted)   # rejects every dark source
    gen = Inverter()
    out = filtered_generate(gen, x, [1, 2], labels=[0, 0], label_filter=f)
    assert f.exhausted == {0: 2} and f.drawn == {0: 6} and f.rejection_rate == {0: 1.0}
    if on_exhausted == "source":
        assert torch.equal(out, x)
    else:                                          # the third and last draw is returned
        last = [retry_seed(s, 2) for s in (1, 2)]
        assert torch.equal(out, filtered_generate(Inverter(), x, last))
        assert gen.calls == 3


def test_labels_must_be_class_indices_or_mapped():
    x = images(2)
    with pytest.raises(DKGMError, match="class_index"):
        filtered_generate(Inverter(), x, [1, 2], labels=["cat", "dog"], label_filter=LabelFilter(Bright()))
    f = LabelFilter(Bright(), class_index={"cat": 1, "dog": 0})
    filtered_generate(Inverter(), x, [1, 2], labels=["cat", "dog"], label_filter=f)
    assert set(f.drawn) == {0, 1}
    # a label the map lacks was taken as a class index of its own: label 1 became index 1, "label 3"
    partial = LabelFilter(Bright(), class_index={3: 0, 7: 1})
    with pytest.raises(DataError, match=r"labels \['1'\] are not in class_index"):
        filtered_generate(Inverter(), x, [1, 2], labels=[3, 1], label_filter=partial)


def test_transform_with_filter_keeps_classes_and_is_deterministic():
    x = images()
    aug = lambda: DKGMAugment(Inverter(), seed=5, label_filter=LabelFilter(Bright()))
    a, b = aug()(x), aug()(x)
    assert torch.equal(a, b)
    assert torch.equal(Bright()(a).argmax(1), Bright()(x).argmax(1))


def test_bad_filter_arguments():
    with pytest.raises(DKGMError, match="LabelFilter"):
        DKGMAugment(Inverter(), label_filter=Bright())
    with pytest.raises(DKGMError, match="max_tries"):
        LabelFilter(Bright(), max_tries=0)
    with pytest.raises(DKGMError, match="on_exhausted"):
        LabelFilter(Bright(), on_exhausted="drop")
    with pytest.raises(DKGMError, match="classifier"):
        LabelFilter(42)
    with pytest.raises(DKGMError, match="no evaluator"):
        LabelFilter("no-such-evaluator")


def test_shipped_evaluator_by_name():
    assert "digits-evaluator" in list_evaluators()
    f = LabelFilter("digits-evaluator")
    from dkgm_aug.data import digits
    test = digits("test")
    x = test.images[:64].float() / 255
    assert (f.predict(x) == test.targets[:64]).float().mean() > 0.9


class Items(torch.utils.data.Dataset):
    """Dark images of class 0 (majority) and bright images of class 1 (minority)."""
    targets = [0] * 6 + [1] * 2

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.full((1, 4, 4), 0.2 if self.targets[i] == 0 else 0.9), self.targets[i]


def test_balanced_dataset_with_filter_keeps_classes_and_logs(caplog, tmp_path):
    import logging
    from dkgm_aug import BalancedDKGMDataset
    make = lambda f, **kw: BalancedDKGMDataset(Items(), Inverter(), seed=1, label_filter=f, progress=False, **kw)
    f = LabelFilter(Bright())
    ds = make(f)
    with caplog.at_level(logging.INFO, logger="dkgm_aug"):
        ds.precompute(progress=False)
    synthetic = [ds[i] for i in range(ds.n_real, len(ds))]
    assert all(int(Bright()(x[None]).argmax()) == y for x, y in synthetic)
    assert "rejected per class" in caplog.text and 1 in f.rejection_rate
    again = make(LabelFilter(Bright())).precompute(progress=False)
    assert all(torch.equal(ds[i][0], again[i][0]) for i in range(len(ds)))
    # a cache made without the filter is not served to a dataset with it
    cache = tmp_path / "c.safetensors"
    make(None, cache=cache).precompute(progress=False)
    with pytest.raises(DKGMError, match="label_filter"):
        make(LabelFilter(Bright()), cache=cache)[ds.n_real]


def test_neighbour_bank_with_filter_logs_its_rejections(caplog, tmp_path):
    """A filtered bank says what its filter rejected, per class, when it makes rows (in memory or
    as shards); reopened from its folder it makes none and logs nothing."""
    import logging
    from dkgm_aug import NeighbourBank
    for path in (None, tmp_path / "bank"):
        f = LabelFilter(Bright())
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dkgm_aug"):
            NeighbourBank(Items(), Inverter(), k=3, label_filter=f, path=path).build(progress=False)
        assert "neighbour bank: label filter" in caplog.text and "rejected per class" in caplog.text
        assert sum(f.rejected.values()) > 0 and set(f.rejection_rate) == {0, 1}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dkgm_aug"):
        NeighbourBank(Items(), Inverter(), k=3, label_filter=LabelFilter(Bright()), path=tmp_path / "bank").build()
    assert "rejected per class" not in caplog.text


@pytest.mark.parametrize("where", [None, "bank.safetensors", "bank"])
def test_neighbour_bank_keeps_its_filter_counts_when_reopened(tmp_path, where):
    """A filtered bank's per-class counts (drawn, rejected, tries run out) are the filter's over its
    rows, and a bank reopened from its file or folder (no rows made, a fresh filter) gives the same."""
    from dkgm_aug import NeighbourBank
    path = None if where is None else tmp_path / where
    f = LabelFilter(Bright(), max_tries=2)
    bank = NeighbourBank(Items(), Inverter(), k=3, label_filter=f, path=path)
    bank.build(progress=False, shard_size=2)                 # a folder of 3 shards: counts summed over them
    made = {"drawn": f.drawn, "rejected": f.rejected, "exhausted": f.exhausted}
    assert sum(f.rejected.values()) > 0 and sum(f.exhausted.values()) > 0
    assert bank.filter_counts == {key: dict(sorted(v.items())) for key, v in made.items()}
    if path is not None:
        fresh = LabelFilter(Bright(), max_tries=2)
        again = NeighbourBank(Items(), Inverter(), k=3, label_filter=fresh, path=path).build(progress=False)
        assert sum(fresh.drawn.values()) == 0 and again.filter_counts == bank.filter_counts
    assert NeighbourBank(Items(), Inverter(), k=3).build(progress=False).filter_counts is None


def test_labels_outside_the_classifiers_outputs_are_refused():
    """A source class the classifier cannot output would reject every neighbour (each synthetic
    item silently a copy): refused by name, as are negative indices."""
    x = images(4)
    for labels in ([1, 2, 0, 1], [0, -1, 0, 0]):
        with pytest.raises(DataError, match="not outputs of the classifier"):
            filtered_generate(Inverter(), x, [1, 2, 3, 4], labels=labels, label_filter=LabelFilter(Bright()))
    filtered_generate(Inverter(), x, [1, 2, 3, 4], labels=[1, 0, 1, 0], label_filter=LabelFilter(Bright()))


def test_a_classifier_without_parameters_is_taken():
    """A rule with no weights (nn.Module with a forward only) filters too (it raised StopIteration)."""
    class Rule(nn.Module):
        def forward(self, x01):
            return nn.functional.one_hot((x01.flatten(1).mean(1) > 0.5).long(), 2).float()
    out = filtered_generate(Inverter(), images(4), [1, 2, 3, 4], labels=[1, 0, 1, 0], label_filter=LabelFilter(Rule()))
    assert out.shape == (4, 1, 4, 4)


def test_the_filter_leaves_every_submodule_of_the_users_classifier_in_its_own_mode():
    """The classifier's mode was restored with ``module.train(was)``: a model being fine-tuned
    (train mode) with a frozen, eval-mode BatchNorm came back with that BatchNorm in train mode,
    and its running statistics then drifted in the user's next forward pass, with no error."""
    clf = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
    clf.train()
    clf[1].eval()
    seen = []
    clf.register_forward_pre_hook(lambda m, args: seen.append([x.training for x in m.modules()]))
    stats = clf[1].running_mean.clone()
    filtered_generate(Inverter(), images(), list(range(6)), labels=[0] * 6,
                      label_filter=LabelFilter(clf, max_tries=2))
    assert seen and all(not any(modes) for modes in seen)          # the filter ran it in eval mode
    assert clf.training and not clf[1].training                   # and gave every submodule its mode back
    clf(torch.rand(4, 1, 4, 4))
    assert torch.equal(clf[1].running_mean, stats)


def test_the_mode_is_given_back_through_train_so_overrides_run():
    """Setting .training back by hand skipped train(): a layer whose eval() merges a delta into its
    weights (LoRA style) and whose train() unmerges it stayed merged after the filter ran."""
    from dkgm_aug.nn import evaluating

    class Merging(nn.Module):
        def __init__(self):
            super().__init__()
            self.merged = False

        def train(self, mode=True):
            self.merged = not mode
            return super().train(mode)
    outer = nn.Sequential(Merging(), nn.Sequential(nn.BatchNorm1d(2)))
    outer.train()
    outer[1][0].eval()
    with evaluating(outer):
        assert outer[0].merged and not outer[1][0].training
    assert not outer[0].merged and outer[0].training and outer.training and not outer[1][0].training


def test_a_class_whose_tries_all_run_out_is_warned_about_once():
    """A classifier whose class indices are not the data's labels (an image folder of digits 3 and 7
    has labels 0 and 1) rejects every neighbour of a class: the tries run out and each source comes
    back as itself, random oversampling under DKGM's name, with no word. Now a warning, once a class
    has 16 sources and half of them ran out, and only once per class."""
    import warnings as w
    f = LabelFilter(Bright(always=1), max_tries=2)
    x, seeds = images(8), list(range(8))
    with w.catch_warnings():
        w.simplefilter("error")
        filtered_generate(Inverter(), x, seeds, labels=[0] * 8, label_filter=f)     # 8 sources: too few to say
    with pytest.warns(UserWarning, match="for 16 of 16 sources of class index 0 every try was rejected"):
        out = filtered_generate(Inverter(), x, seeds, labels=[0] * 8, label_filter=f)
    assert torch.equal(out, x)                                                        # copies, as warned
    with w.catch_warnings():
        w.simplefilter("error")
        filtered_generate(Inverter(), x, seeds, labels=[0] * 8, label_filter=f)     # said once
    f.reset()                                                                         # counters and warnings anew
    filtered_generate(Inverter(), x, seeds, labels=[0] * 8, label_filter=f)
    with pytest.warns(UserWarning, match="for 16 of 16 sources"):
        filtered_generate(Inverter(), x, seeds, labels=[0] * 8, label_filter=f)
    old = dict(f.__getstate__())
    del old["sources"], old["_warned"]                                                # a filter pickled before
    g = LabelFilter.__new__(LabelFilter)
    g.__setstate__(old)
    filtered_generate(Inverter(), x, seeds, labels=[0] * 8, label_filter=g)
