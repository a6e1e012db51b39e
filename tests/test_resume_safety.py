"""Resuming never mixes two runs (issue 12): every way a resume used to train on silently
is now an error that says how to start over, or works correctly."""
import csv
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dkgm_aug import CheckpointError, DKGMError, Trainer
from conftest import micro_model, shapes_batch

START_OVER = ("--no-resume", "resume=False")


def trainer(out, data=None, model=None, **kw):
    kw = dict(batch_size=4, max_steps=2, progress=False) | kw
    data = shapes_batch(12, size=8) if data is None else data
    return Trainer(model or micro_model(image_size=8), data, out_dir=out, **kw)


def weights(net):
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def log_steps(out, stage=1):
    return [int(r["step"]) for r in csv.DictReader(open(out / f"log_stage{stage}.csv"))]


def rewrite_state(path, edit):
    """Apply ``edit(meta, tensors)`` to a saved training state."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["state"]), {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(path), metadata={"state": json.dumps(meta)})


def test_stage2_resume_keeps_the_stage1_just_trained(tmp_path):
    t = trainer(tmp_path)
    t.fit(1)
    t.fit(2)
    t = trainer(tmp_path, max_steps=4)          # the same command again, with more steps
    t.fit(1)
    stage1 = weights(t.model.stage1)
    t.fit(2)
    for k, v in t.model.stage1.state_dict().items():
        assert torch.equal(v.cpu(), stage1[k]), k   # stage 2's state holds no stage-1 weights to restore


@pytest.mark.parametrize("change, flag", [
    (dict(lr=1e-3), "--lr / lr="),
    (dict(batch_size=2), "--batch-size"),
    (dict(seed=1), "--seed / seed="),
    (dict(data=shapes_batch(12, size=8, seed=1)), "--data"),
    (dict(data=shapes_batch(10, size=8)), "--limit"),
    (dict(ema_decay=0.5), "ema_decay="),
    (dict(grad_clip=0.0), "grad_clip="),
])
def test_resume_with_other_settings_is_refused(tmp_path, change, flag):
    trainer(tmp_path).fit(1)
    with pytest.raises(DKGMError, match=flag) as err:
        trainer(tmp_path, max_steps=4, **change).fit(1)
    assert all(s in str(err.value) for s in START_OVER), err.value


def test_resume_on_another_dataset_of_the_same_length_is_refused(tmp_path):
    class Items(torch.utils.data.Dataset):
        def __init__(self, seed):
            self.x = shapes_batch(12, size=8, seed=seed)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], 0
    trainer(tmp_path, data=Items(0)).fit(1)
    with pytest.raises(DKGMError, match="--data"):
        trainer(tmp_path, data=Items(1), max_steps=4).fit(1)
    trainer(tmp_path, data=Items(0), max_steps=4).fit(1)         # the same items resume


def test_resume_with_another_transform_of_the_same_images_is_refused(tmp_path):
    """An ImageDataset's fingerprint hashed its .images only: a rerun whose transform changes what the
    model sees (inverted here) resumed the other run's training silently."""
    from dkgm_aug.data import ImageDataset
    x = (shapes_batch(12, size=8) * 255).round().to(torch.uint8)
    trainer(tmp_path, data=ImageDataset(x, torch.zeros(12))).fit(1)
    with pytest.raises(DKGMError, match="--data"):
        trainer(tmp_path, data=ImageDataset(x, torch.zeros(12), transform=lambda im: 1 - im), max_steps=4).fit(1)
    trainer(tmp_path, data=ImageDataset(x, torch.zeros(12)), max_steps=4).fit(1)   # the same pipeline resumes
    assert log_steps(tmp_path)[-1] == 4


def test_resume_with_a_dataloader_over_another_subset_is_refused(tmp_path):
    """A DataLoader's fingerprint read its dataset only: a rerun over another subset (another
    SubsetRandomSampler) resumed the first run, and with the same step count trained 0 steps and
    handed back the other subset's model."""
    from torch.utils.data import DataLoader, SubsetRandomSampler
    data = shapes_batch(12, size=8)

    def loader(idx):
        return DataLoader(data, batch_size=4, sampler=SubsetRandomSampler(idx))
    trainer(tmp_path, data=loader(list(range(12)))).fit(1)
    with pytest.raises(DKGMError, match="--data"):
        trainer(tmp_path, data=loader(list(range(6)))).fit(1)
    trainer(tmp_path, data=loader(list(range(12))), max_steps=4).fit(1)   # the same subset resumes
    assert log_steps(tmp_path)[-1] == 4


def test_dataset_with_random_transform_still_resumes(tmp_path):
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return torch.rand(1, 8, 8), 0
    trainer(tmp_path, data=Noisy()).fit(1)
    trainer(tmp_path, data=Noisy(), max_steps=4).fit(1)
    assert log_steps(tmp_path)[-1] == 4


def test_resume_with_fewer_steps_is_refused(tmp_path):
    trainer(tmp_path, max_steps=4).fit(1)
    with pytest.raises(DKGMError, match="step 4, more than max_steps=2") as err:
        trainer(tmp_path, max_steps=2).fit(1)
    assert "--stage1-steps" in str(err.value) and all(s in str(err.value) for s in START_OVER)
    with pytest.warns(UserWarning, match="trains nothing"):    # done already: nothing to train (a new init: said)
        trainer(tmp_path, max_steps=4).fit(1)


def test_log_drops_rows_logged_after_the_last_save(tmp_path):
    trainer(tmp_path, log_every=1).fit(1)
    with open(tmp_path / "log_stage1.csv", "a", newline="") as f:   # a run killed after step 3
        csv.writer(f).writerows([[3, 0.5, 1, 1], [4, 0.5, 1, 1]])
    trainer(tmp_path, max_steps=4, log_every=1).fit(1)
    assert log_steps(tmp_path) == [1, 2, 3, 4]


def test_resume_says_so(tmp_path, capsys):
    trainer(tmp_path).fit(1)
    capsys.readouterr()
    trainer(tmp_path, max_steps=4).fit(1)
    assert "resuming stage 1 from step 2 of 4" in capsys.readouterr().err


def test_state_from_older_code_resumes_with_a_warning(tmp_path):
    trainer(tmp_path).fit(1)
    model = micro_model(image_size=8)

    def old_layout(meta, tensors):   # no recorded settings, and both stages' weights
        for key in ("lr", "batch_size", "data"):
            del meta[key]
        tensors.update({f"model.stage2.{k}": v for k, v in model.stage2.state_dict().items()})
    rewrite_state(tmp_path / "state_stage1.safetensors", old_layout)
    with pytest.warns(UserWarning, match="could not be checked"):
        trainer(tmp_path, max_steps=4).fit(1)
    assert log_steps(tmp_path)[-1] == 4


def test_truncated_state_file(tmp_path):
    trainer(tmp_path).fit(1)
    path = tmp_path / "state_stage1.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        trainer(tmp_path, max_steps=4).fit(1)
    assert str(path) in str(err.value) and all(s in str(err.value) for s in START_OVER)


def test_nan_in_saved_ema_weights_is_refused_at_load(tmp_path):
    trainer(tmp_path).fit(1)

    def poison(meta, tensors):
        name = next(k for k in tensors if k.startswith("ema.") and tensors[k].is_floating_point())
        tensors[name] = torch.full_like(tensors[name], float("nan"))
    rewrite_state(tmp_path / "state_stage1.safetensors", poison)
    with pytest.raises(CheckpointError, match="NaN") as err:
        trainer(tmp_path, max_steps=4).fit(1)
    assert "state_stage1.safetensors" in str(err.value)


def test_other_model_config_names_both_ways_to_start_over(tmp_path):
    trainer(tmp_path).fit(1)
    with pytest.raises(DKGMError, match="model") as err:
        trainer(tmp_path, model=micro_model(image_size=8, alpha=0.3), max_steps=4).fit(1)
    assert all(s in str(err.value) for s in START_OVER)


def test_no_resume_starts_over(tmp_path):
    trainer(tmp_path, max_steps=4).fit(1)
    trainer(tmp_path, lr=1e-3, resume=False).fit(1)              # other settings, fewer steps: a new run
    assert log_steps(tmp_path) == [2]
    with safe_open(str(tmp_path / "state_stage1.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
    assert (meta["step"], meta["lr"]) == (2, 1e-3)


def test_default_out_dir_refuses_other_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Trainer(micro_model(image_size=8), shapes_batch(12, size=8), batch_size=4, max_steps=2, progress=False).fit(1)
    with pytest.raises(DKGMError, match="--data"):
        Trainer(micro_model(image_size=8), shapes_batch(8, size=8), batch_size=4, max_steps=2, progress=False).fit(1)


def test_a_cuda_runs_state_keeps_and_restores_the_device_rng(tmp_path, monkeypatch):
    """On CUDA, dropout draws from the device's generator: the state keeps each rank's
    (``rng.cuda.<rank>``) and a resume sets it back (only the CPU one was kept, so GPU dropout
    masks restarted from the seed). A CPU run's state has no such tensor."""
    from dkgm_aug.train.ema import EMA
    from dkgm_aug.train.state import read_state, restore, write_state
    net = torch.nn.Linear(2, 2)
    ema, opt, gen = EMA(net, 0.9), torch.optim.Adam(net.parameters()), torch.Generator()
    cuda_state = torch.arange(16, dtype=torch.uint8)
    meta = dict(step=1, model_config={})
    write_state(tmp_path / "gpu.safetensors", "model.", net, ema, opt,
                [(gen.get_state(), torch.get_rng_state(), cuda_state)], meta)
    write_state(tmp_path / "cpu.safetensors", "model.", net, ema, opt,
                [(gen.get_state(), torch.get_rng_state(), None)], meta)
    assert "rng.cuda.0" not in read_state(tmp_path / "cpu.safetensors")[1]
    saved_meta, tensors = read_state(tmp_path / "gpu.safetensors")
    assert torch.equal(tensors["rng.cuda.0"], cuda_state)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, device)))
    restore(tensors, saved_meta, "model.", net, ema, opt, gen, 0, torch.device("cuda", 0))
    assert len(calls) == 1 and torch.equal(calls[0][0], cuda_state) and calls[0][1] == torch.device("cuda", 0)


def test_samplers_of_every_shape_are_fingerprinted_without_failing(tmp_path):
    """The sampler digest turned every list-like attribute into one tensor: a class-balanced sampler
    holding per-class index lists of different lengths made Trainer(...) raise ValueError, and numpy
    indices were hashed by their repr, which numpy cuts with '...' past 1,000 items."""
    import numpy as np
    from torch.utils.data import DataLoader, Sampler, SubsetRandomSampler
    from dkgm_aug.train.data import data_fingerprint

    class PerClass(Sampler):
        def __init__(self):
            self.indices = [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]]     # ragged: one list per class

        def __iter__(self):
            return iter(sum(self.indices, []))

        def __len__(self):
            return 10
    data = shapes_batch(3000, size=8)
    trainer(tmp_path, data=DataLoader(data[:12], batch_size=4, sampler=PerClass())).fit(1)
    fp = lambda sampler: data_fingerprint(DataLoader(data, batch_size=4, sampler=sampler))  # noqa: E731
    a, b = np.arange(2000), np.arange(2000)
    b[1500] = 2500                                           # one index differs, far past numpy's repr cut
    assert fp(SubsetRandomSampler(a)) != fp(SubsetRandomSampler(b))
    assert fp(list(range(2000))) != fp(list(range(1, 2001)))  # a plain list as the sampler
    assert fp(SubsetRandomSampler(a)) == fp(SubsetRandomSampler(a.copy()))


def test_a_state_fingerprinted_by_the_older_rule_resumes_with_a_warning(tmp_path):
    """States written before transforms and samplers counted hold the older fingerprint of a
    DataLoader (its dataset only): the same data resume with a warning instead of being refused."""
    from torch.utils.data import DataLoader
    from dkgm_aug.train.data import data_fingerprint
    loader = DataLoader(shapes_batch(12, size=8), batch_size=4)
    trainer(tmp_path, data=loader).fit(1)
    old = f"12 items, sha256 {data_fingerprint(loader, legacy=True)}"
    rewrite_state(tmp_path / "state_stage1.safetensors", lambda meta, tensors: meta.update(data=old))
    with pytest.warns(UserWarning, match="as an older dkgm_aug computed it"):
        trainer(tmp_path, data=loader, max_steps=4).fit(1)
    assert log_steps(tmp_path)[-1] == 4
    rewrite_state(tmp_path / "state_stage1.safetensors", lambda meta, tensors: meta.update(data="12 items, sha256 0"))
    with pytest.raises(DKGMError, match="--data"):
        trainer(tmp_path, data=loader, max_steps=6).fit(1)


def test_a_model_with_other_starting_weights_warns_instead_of_resuming_silently(tmp_path):
    """Two replicates seeded apart (torch.manual_seed) sharing out_dir, or a checkpoint loaded to be
    fine-tuned: the second resumed the first run's state, discarding the weights passed in, with no word."""
    import warnings
    torch.manual_seed(1)
    trainer(tmp_path).fit(stage=1)
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match="started from other weights than the model passed in, and is at step 2 "
                                         "of 2 already: resuming trains nothing"):
        trainer(tmp_path).fit(stage=1)
    torch.manual_seed(3)
    loaded = micro_model(image_size=8)
    loaded.info["training"] = {"data": "elsewhere"}                # a checkpoint loaded to be fine-tuned
    with pytest.warns(UserWarning, match="started from other weights"):
        trainer(tmp_path, model=loaded, max_steps=4).fit(stage=1)
    with warnings.catch_warnings():      # more steps for the finished run, from a fresh model: what was asked
        warnings.simplefilter("error")
        trainer(tmp_path, max_steps=5).fit(stage=1)
    # the same run resumed: the same seeded init, its returned (EMA) model, or one more fit() of it
    other = tmp_path / "b"
    torch.manual_seed(3)
    trainer(other, max_steps=2).fit(stage=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(3)
        t = trainer(other, max_steps=4)
        t.fit(stage=1, max_steps=3)
        t.fit(stage=1)
        trainer(other, model=t.model, max_steps=5).fit(stage=1)


def test_an_unseeded_restart_of_an_unfinished_run_resumes_without_a_warning(tmp_path):
    """The usual restart after a crash: a fresh model (another random init), the run unfinished; and an
    interrupted fit() run again on the same model object; and a state from before the start was recorded."""
    import warnings
    t = trainer(tmp_path, max_steps=4)
    t.fit(stage=1, max_steps=2)                                     # 'killed' after step 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer(tmp_path, max_steps=4).fit(stage=1, max_steps=3)    # a new process, a new init
        t.model.stage1.apply(lambda m: m.weight.data.add_(0.01) if isinstance(m, torch.nn.Conv2d) else None)
        t.fit(stage=1)                                              # live weights past the last save
    rewrite_state(tmp_path / "state_stage1.safetensors", lambda meta, tensors: meta.pop("start_weights"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for steps in (5, 6):                                        # an old state, resumed twice
            torch.manual_seed(0)
            trainer(tmp_path, max_steps=steps).fit(stage=1)


def test_a_two_stage_script_restarted_during_stage_2_resumes_without_a_warning(tmp_path):
    """README's pattern, unseeded: stage 1 finished, stage 2 cut short; the rerun's fresh model found stage 1
    'at max_steps already' and warned of a replicate. A later stage's state beside it marks a restart."""
    import warnings
    t = trainer(tmp_path, max_steps=2)
    t.fit(stage=1)
    t.fit(stage=2, max_steps=1)                                     # 'killed' during stage 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = trainer(tmp_path, max_steps=2)                      # a new process, a new init
        again.fit(stage=1)
        again.fit(stage=2)
