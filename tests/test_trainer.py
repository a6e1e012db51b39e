import csv

import pytest
import torch
from safetensors import safe_open

import dkgm_aug
from dkgm_aug import EVAE, DataError, DKGMError, Trainer
from dkgm_aug.data import ImageDataset
from conftest import micro_model, shapes_batch


def weights(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_outputs_and_data_kinds(tmp_path):
    x = shapes_batch(20)
    ds = ImageDataset((x * 255).round().to(torch.uint8), torch.zeros(20))
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    for i, data in enumerate([x, (x * 255).to(torch.uint8), ds, loader]):
        model = micro_model()
        before = weights(model)
        out = tmp_path / f"run{i}"
        Trainer(model, data, out_dir=out, batch_size=5, max_steps=3, save_every=2, progress=False).fit(1)
        assert any(not torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items())
        rows = list(csv.DictReader(open(out / "log_stage1.csv")))
        assert rows and float(rows[-1]["loss"]) > 0 and int(rows[-1]["step"]) == 3
        assert (out / "samples_stage1_step2.png").exists() and (out / "model.safetensors").exists()


def test_epochs_and_stage2_grid(tmp_path):
    t = Trainer(micro_model(), shapes_batch(12), out_dir=tmp_path, batch_size=4, epochs=2, progress=False)
    assert t.max_steps == 6
    t.fit(2)
    assert (tmp_path / "samples_stage2_step6.png").exists() and (tmp_path / "state_stage2.safetensors").exists()


def test_resume_matches_uninterrupted_run(tmp_path):
    x = shapes_batch(24)
    torch.manual_seed(0)
    full = micro_model()
    init = weights(full)
    Trainer(full, x, out_dir=tmp_path / "full", batch_size=4, max_steps=8, save_every=4, progress=False).fit(1)

    part = micro_model()
    part.load_state_dict(init)
    Trainer(part, x, out_dir=tmp_path / "part", batch_size=4, max_steps=4, save_every=4, progress=False).fit(1)
    resumed = micro_model()                     # a fresh process would start from new weights
    t = Trainer(resumed, x, out_dir=tmp_path / "part", batch_size=4, max_steps=8, save_every=4, progress=False)
    t.fit(1)
    rows = list(csv.DictReader(open(tmp_path / "part" / "log_stage1.csv")))
    assert [int(r["step"]) for r in rows][-1] == 8 and len(rows) == 2   # continued, not restarted
    for k, v in full.stage1.state_dict().items():   # a stage-1 state restores stage 1 only
        assert torch.allclose(v, resumed.stage1.state_dict()[k], atol=1e-6), k


@pytest.mark.parametrize("data, match", [
    (torch.zeros(0, 1, 8, 8), "empty"),
    (torch.zeros(4, 3, 8, 8), "channels"),
    (torch.zeros(4, 8, 8), r"\[N, C, H, W\]"),
    ([1, 2, 3], "must be a tensor"),
])
def test_bad_data(tmp_path, data, match):
    with pytest.raises(DataError, match=match):
        Trainer(micro_model(), data, out_dir=tmp_path, max_steps=1)


@pytest.mark.parametrize("data", [
    torch.full((4, 1, 8, 8), 200.0),                       # floats in [0, 255]: 0-1 was meant
    torch.full((4, 1, 8, 8), -0.5),                        # already normalised to [-1, 1]
    torch.full((4, 1, 8, 8), 3, dtype=torch.int64),        # integer images: cast, not scaled, before
])
def test_images_outside_zero_one_fail_instead_of_training_on_garbage(tmp_path, data):
    with pytest.raises(DataError, match=r"\[0, 1\]|uint8"):
        Trainer(micro_model(image_size=8), data, out_dir=tmp_path, batch_size=2, max_steps=1, progress=False)


def test_nan_data_and_bad_args(tmp_path):
    x = torch.full((4, 1, 8, 8), float("nan"))
    with pytest.raises(DataError, match="NaN"):
        Trainer(micro_model(), x, out_dir=tmp_path, batch_size=2, max_steps=1, progress=False).fit(1)
    with pytest.raises(DKGMError, match="exactly one"):
        Trainer(micro_model(), shapes_batch(4), out_dir=tmp_path)
    with pytest.raises(DKGMError, match="stage"):
        Trainer(micro_model(), shapes_batch(4), out_dir=tmp_path, max_steps=1).fit(3)


@pytest.mark.parametrize("kw, match", [
    (dict(lr=0), "lr"), (dict(lr=float("nan")), "lr"), (dict(ema_decay=1.0), "ema_decay"),
    (dict(ema_decay=-0.1), "ema_decay"), (dict(save_every=0), "save_every"), (dict(log_every=0), "log_every"),
    (dict(num_workers=-1), "num_workers"), (dict(grad_clip=-1.0), "grad_clip"), (dict(seed=-1), "seed"),
    (dict(seed=2 ** 63), "seed"), (dict(seed=1.5), "seed"), (dict(batch_size=0), "batch_size"),
    (dict(max_steps=2.5), "max_steps"), (dict(max_steps=None, epochs=0), "epochs"),
    (dict(device="nonsense"), "device"),
])
def test_bad_arguments_fail_at_construction(tmp_path, kw, match):
    kw = dict(out_dir=tmp_path, max_steps=1, progress=False) | kw
    with pytest.raises(DKGMError, match=match):
        Trainer(micro_model(image_size=8), shapes_batch(4, size=8), **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_fails_at_construction(tmp_path):
    with pytest.raises(DKGMError, match="CUDA is not available"):
        Trainer(micro_model(image_size=8), shapes_batch(4, size=8), out_dir=tmp_path, max_steps=1, device="cuda")


def tiny_evae(seed=0):
    torch.manual_seed(seed)
    return EVAE(channels=1, image_size=8, d_z=3, widths=(4, 4, 8, 8), M=12)


def test_one_stage_model_resumes_like_an_uninterrupted_run(tmp_path):
    """An EVAE trains through the same contract: its one stage is the whole model (BatchNorm
    statistics included), under ``model.*`` in the state file."""
    x = shapes_batch(12, size=8)
    kw = dict(batch_size=4, save_every=2, progress=False)
    full = tiny_evae()
    Trainer(full, x, out_dir=tmp_path / "full", max_steps=4, **kw).fit(1)
    Trainer(tiny_evae(), x, out_dir=tmp_path / "part", max_steps=2, **kw).fit(1)
    resumed = tiny_evae(seed=1)                 # a fresh process would start from new weights
    Trainer(resumed, x, out_dir=tmp_path / "part", max_steps=4, **kw).fit(1)
    for k, v in full.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-6), k
    with safe_open(str(tmp_path / "part" / "state_stage1.safetensors"), "pt") as f:
        assert "model.encoder.head_mu.weight" in f.keys() and "ema.decoder.fc.weight" in f.keys()
    assert isinstance(dkgm_aug.load(tmp_path / "part" / "model.safetensors"), EVAE)
    assert (tmp_path / "part" / "samples_stage1_step4.png").exists()
    with pytest.raises(DKGMError, match="stage must be 1"):
        Trainer(tiny_evae(), x, out_dir=tmp_path / "x", max_steps=1, **kw).fit(2)


def test_no_out_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = Trainer(micro_model(image_size=8), shapes_batch(8, size=8), out_dir=None, batch_size=4, max_steps=3,
                save_every=1, progress=False)
    t.fit(1)
    t.fit(1, max_steps=4)                       # nothing to resume from: starts again
    assert len(t.losses) == 4 and all(v > 0 for v in t.losses) and list(tmp_path.iterdir()) == []


class _Flip(torch.utils.data.Dataset):
    """Images with a random flip drawn from torch's global RNG, as torchvision's transforms do."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i].flip(-1) if torch.rand(()) < 0.5 else self.x[i]


def _dropout_model():
    from dkgm_aug import DKGM, UNetConfig
    torch.manual_seed(0)
    cfg = dict(channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(), dropout=0.1)
    return DKGM(UNetConfig(**cfg), UNetConfig(**cfg, time_input=True), image_size=8)


@pytest.mark.parametrize("save_every, stop", [(3, 6), (4, 8)])       # mid-epoch (6 of 12), epoch boundary (8)
def test_dataset_with_random_transforms_and_dropout_resumes_like_an_uninterrupted_run(tmp_path, save_every, stop):
    """A Dataset read through torch-random transforms, into a model with dropout: stopped and resumed,
    the run ends with the weights of the uninterrupted one (the per-epoch DataLoader drew its seed,
    and the sample grid read its images, from torch's global RNG, which a resume restores: the two
    runs drifted apart)."""
    data = _Flip(shapes_batch(16, size=8))
    run = lambda out, steps, model: Trainer(model, data, out_dir=out, batch_size=4, max_steps=steps,
                                            save_every=save_every, progress=False).fit(1)
    full, part = _dropout_model(), _dropout_model()
    run(tmp_path / "full", 12, full)
    run(tmp_path / "part", stop, part)
    resumed = _dropout_model()
    run(tmp_path / "part", 12, resumed)
    for k, v in full.stage1.state_dict().items():
        assert torch.equal(v, resumed.stage1.state_dict()[k]), k


def test_a_dataloaders_epoch_is_its_own_batches_and_fit_steps_are_for_one_call(tmp_path):
    """epochs= counts a given DataLoader's batches (it counted N // the Trainer's batch_size);
    fit(stage, max_steps=k) trains k steps in that call only (it changed the Trainer's for good)."""
    loader = torch.utils.data.DataLoader(shapes_batch(40, size=8), batch_size=4)
    assert Trainer(micro_model(image_size=8), loader, out_dir=None, epochs=1, progress=False).max_steps == 10
    t = Trainer(micro_model(image_size=8), shapes_batch(8, size=8), out_dir=None, batch_size=4, max_steps=5,
                progress=False)
    t.fit(1, max_steps=2)
    assert len(t.losses) == 2 and t.max_steps == 5
    t.fit(2)
    assert len(t.losses) == 5


def test_resuming_a_dataloader_skips_the_batches_already_trained(tmp_path):
    """A run on an unshuffled DataLoader stopped mid-epoch and resumed ends as the uninterrupted one
    (it started the epoch over, training its first batches twice); a shuffled loader without
    set_epoch says that the rest of the epoch comes from a new shuffle."""
    loader = lambda shuffle=False: torch.utils.data.DataLoader(shapes_batch(24, size=8), batch_size=4,
                                                               shuffle=shuffle)
    run = lambda out, steps, model, data: Trainer(model, data, out_dir=out, max_steps=steps, save_every=4,
                                                  progress=False).fit(1)
    torch.manual_seed(0)
    full = micro_model(image_size=8)
    init = weights(full)
    run(tmp_path / "full", 8, full, loader())
    part = micro_model(image_size=8)
    part.load_state_dict(init)
    run(tmp_path / "part", 4, part, loader())
    resumed = micro_model(image_size=8)
    run(tmp_path / "part", 8, resumed, loader())
    for k, v in full.stage1.state_dict().items():
        assert torch.allclose(v, resumed.stage1.state_dict()[k], atol=1e-6), k
    run(tmp_path / "shuffled", 4, micro_model(image_size=8), loader(True))
    with pytest.warns(UserWarning, match="new shuffle"):
        run(tmp_path / "shuffled", 8, micro_model(image_size=8), loader(True))


def test_dataset_loader_workers_are_seeded_per_rank_and_stage():
    """The per-epoch loader of a Dataset has its own generator: seeded by the seed and epoch, and by
    the rank and stage too, or every rank's workers (and both stages') drew the same transforms."""
    from dkgm_aug.train.data import Feed

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(1, 4, 4)
    first = lambda rank, stage: next(Feed(Noisy(), "cpu", 4, 0, rank=rank, world_size=2, num_workers=1)
                                     .batches(0, stream=stage))
    assert not torch.equal(first(0, 1), first(1, 1)) and not torch.equal(first(0, 1), first(0, 2))
    assert torch.equal(first(0, 1), first(0, 1))


def test_data_of_another_size_than_the_models_image_size():
    """The trainer checked channels only: an EVAE built at its default 28x28 trained on 32x32 images
    without a word, and its checkpoint said 28x28 (its decoder then made 28x28 images from inputs
    zero-padded to a size it never saw). An EVAE or VAE is refused; a DKGM trains, with a warning."""
    from dkgm_aug import EVAE
    from dkgm_aug.errors import DataError
    evae = EVAE(channels=1, image_size=10, d_z=3, widths=(4, 4, 8, 8))
    with pytest.raises(DataError, match="images are 8x8 but the model was built with image_size=10x10"):
        Trainer(evae, shapes_batch(8, size=8), out_dir=None, batch_size=4, max_steps=1, progress=False)
    with pytest.warns(UserWarning, match="its checkpoint will say 16x16"):
        Trainer(micro_model(image_size=16), shapes_batch(8, size=8), out_dir=None, batch_size=4, max_steps=1,
                progress=False)
