import json

import numpy as np
import pytest
import torch

import dkgm_aug
from dkgm_aug import DataError
from dkgm_aug.cli import main
from dkgm_aug.checkpoint import read_metadata
from dkgm_aug.data import FASHION_MNIST_DIR, load_dataset
from dkgm_aug.vae import EVAE, VAE
from conftest import micro_model


def test_train_info_sample(tmp_path, capsys):
    out = tmp_path / "gen.safetensors"
    assert main(["train", "--data", "digits", "--limit", "64", "--stage1-steps", "3", "--stage2-steps", "2",
                 "--batch-size", "16", "--work-dir", str(tmp_path / "run"), "--out", str(out), "--quiet",
                 "--kernel", "epanechnikov"]) == 0
    model = dkgm_aug.load(out)
    assert model.image_size == (8, 8) and model.kernel == "epanechnikov"
    training = model.info["training"]
    assert training["stage1_steps"] == 3 and training["command"].startswith("dkgm-aug train --data digits")
    assert training["wall_time_s"] > 0 and "CPU" in training["hardware"]
    assert model.info["classes"] == [str(i) for i in range(10)]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "dkgm" and info["parameters"]["stage2"] > 0
    assert main(["sample", str(out), "--data", "digits", "--split", "all", "--n", "3", "--k", "2",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0


def test_info_says_what_any_library_file_is(capsys):
    """A FeatureNet (here the shipped evaluator) is not a generator: `info` says what it is instead of
    failing with a format error."""
    from dkgm_aug.checkpoint import PRETRAINED_DIR
    assert main(["info", str(PRETRAINED_DIR / "evaluators" / "fashion-mnist-evaluator.safetensors")]) == 0
    what = json.loads(capsys.readouterr().out)
    assert what["format"] == "feature-net" and "FeatureNet" in what["summary"]


def test_errors_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.safetensors")]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    assert main(["train", "--data", "nonexistent", "--out", str(tmp_path / "x")]) == 2


TRAIN = ["train", "--data", "digits", "--limit", "64", "--preset", "tiny", "--stage1-steps", "2",
         "--stage2-steps", "1", "--batch-size", "16", "--quiet"]


def test_default_work_dir_follows_out_and_resume_checks_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(TRAIN + ["--out", "a.safetensors"]) == 0
    assert main(TRAIN[:4] + ["32"] + TRAIN[5:] + ["--out", "b.safetensors"]) == 0
    a, b = dkgm_aug.load("a.safetensors").state_dict(), dkgm_aug.load("b.safetensors").state_dict()
    assert any(not torch.equal(v, b[k]) for k, v in a.items())      # b was trained, not copied from a
    assert (tmp_path / "runs" / "a").is_dir() and (tmp_path / "runs" / "b").is_dir()
    capsys.readouterr()
    refusals = ((["--limit", "32"], "--data"), (["--lr", "0.001"], "--lr"), (["--stage1-steps", "1"], "--stage1-steps"))
    for change, flag in refusals:
        assert main(TRAIN + change + ["--out", "a.safetensors"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dkgm-aug: error: ") and flag in err and "--no-resume" in err, err
    assert main(TRAIN + ["--lr", "0.001", "--no-resume", "--out", "a.safetensors"]) == 0
    assert dkgm_aug.load("a.safetensors").info["training"]["lr"] == 0.001


def test_train_evae_resumes_and_writes_an_evae(tmp_path, capsys):
    out, work = tmp_path / "evae.safetensors", tmp_path / "run"
    cmd = ["train", "--kind", "evae", "--data", "digits", "--limit", "64", "--batch-size", "16", "--d-z", "8",
           "--quiet", "--work-dir", str(work), "--out", str(out)]
    assert main(cmd + ["--stage1-steps", "2"]) == 0
    first = dkgm_aug.load(out).state_dict()
    capsys.readouterr()
    assert main(cmd + ["--stage1-steps", "4"]) == 0                  # the same command, more steps
    assert "resuming stage 1 from step 2 of 4" in capsys.readouterr().err
    assert read_metadata(out)["kind"] == "evae"
    model = dkgm_aug.load(out)
    assert type(model) is EVAE and (model.d_z, model.M, model.image_size, model.alpha) == (8, 64, (8, 8), 1.0)
    assert any(not torch.equal(v, first[k]) for k, v in model.state_dict().items())   # trained on
    training = model.info["training"]
    assert training["stage1_steps"] == 4 and "stage2_steps" not in training and training["batch_size"] == {"1": 16}
    assert sorted(p.name for p in work.iterdir()) == [
        "log_stage1.csv", "model.safetensors", "samples_stage1_step2.png", "samples_stage1_step4.png",
        "state_stage1.safetensors"]
    assert [r.split(",")[0] for r in (work / "log_stage1.csv").read_text().split()[1:]] == ["2", "4"]
    assert main(["sample", str(out), "--n", "2", "--k", "1", "--out", str(tmp_path / "s.png")]) == 0
    assert main(cmd + ["--stage1-steps", "4", "--d-z", "4"]) == 2   # another model: no resume
    assert "another model" in capsys.readouterr().err


def test_train_vae(tmp_path):
    out = tmp_path / "vae.safetensors"
    assert main(["train", "--kind", "vae", "--data", "digits", "--limit", "32", "--batch-size", "16", "--d-z", "4",
                 "--stage1-steps", "1", "--quiet", "--work-dir", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert type(dkgm_aug.load(out)) is VAE and read_metadata(out)["kind"] == "vae"


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())   # as argparse wraps it for the terminal
    assert exit_.value.code == 0 and "(default: 2000)" in out and "--no-resume" in out and "--size" in out
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"dkgm-aug {dkgm_aug.__version__}"


def test_demo_is_a_real_subcommand(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0 and "--rho" in out and "--out" in out and "(default: 100.0)" in out
    assert main(["demo", "--rho", "0.5", "--out", str(tmp_path / "d")]) == 2   # checked before any data is read
    assert "--rho must be a number >= 1" in capsys.readouterr().err


def test_python_m_demo_gives_one_line_errors_not_tracebacks(tmp_path, capsys):
    """``python -m dkgm_aug.demo`` (what ``make demo`` runs) printed tracebacks for a bad --rho, --timed
    or an --out it cannot create; it now answers like ``dkgm-aug demo``: one line, exit status 2."""
    from dkgm_aug.demo import main as demo_main
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv, message in ((["--rho", "0"], "--rho must be a number >= 1"),
                          (["--timed", "0"], "--timed must be an integer >= 1"),
                          (["--out", str(blocker / "sub")], "cannot create the folder")):
        assert demo_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_size_channels_and_sample_on_the_training_data(tmp_path, capsys):
    out = tmp_path / "gen.safetensors"
    assert main(TRAIN + ["--size", "12x10", "--channels", "3", "--work-dir", str(tmp_path / "run"),
                         "--out", str(out)]) == 0
    model = dkgm_aug.load(out)
    assert model.image_size == (12, 10) and model.channels == 3
    assert model.info["training"]["data_spec"]["data"] == "digits"
    assert main(["sample", str(out), "--n", "2", "--k", "1", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(TRAIN + ["--size", "0"])


def test_sample_without_recorded_data_asks_for_data(tmp_path, capsys):
    micro_model(image_size=8).save(tmp_path / "g.safetensors")
    assert main(["sample", str(tmp_path / "g.safetensors"), "--out", str(tmp_path / "s.png")]) == 2
    assert "--data" in capsys.readouterr().err


def test_split_is_refused_for_npz_and_folders(tmp_path, capsys):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    assert main(["train", "--data", str(path), "--split", "test", "--out", str(tmp_path / "g.safetensors")]) == 2
    assert "split" in capsys.readouterr().err
    with pytest.raises(DataError, match="split"):
        load_dataset(path, split="train")
    assert len(load_dataset(path)) == 4


def test_dkgm_flags_with_another_kind_and_bad_sample_counts_are_refused(tmp_path, capsys):
    """--kind evae/vae has no DKGM knobs: --preset, --kernel, --m, --steps, the blur range and the
    stage-2 flags were silently ignored (yet recorded in the checkpoint's command); sample --n -1
    sliced the images and wrote all but one."""
    base = ["train", "--kind", "evae", "--data", "digits", "--limit", "32", "--batch-size", "16", "--stage1-steps", "1",
            "--quiet", "--work-dir", str(tmp_path / "run"), "--out", str(tmp_path / "e.safetensors")]
    for flag in (["--kernel", "epanechnikov"], ["--preset=small"], ["--m", "2"], ["--stage2-steps", "5"]):
        assert main(base + flag) == 2
        assert "--kind evae has none" in capsys.readouterr().err
    assert main(base) == 0
    dkgm = [a for a in base if a not in ("--kind", "evae")] + ["--d-z", "8"]   # the reverse: an EVAE knob, a DKGM
    assert main(dkgm) == 2 and "--d-z sets the latent dimension" in capsys.readouterr().err
    for short in (["--kern", "epanechnikov"], ["--pres", "small"], ["--stage2-s", "5"]):   # argparse took prefixes,
        with pytest.raises(SystemExit):                                                 # which the checks missed
            main(base + short)
        assert "unrecognized arguments" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "e.safetensors"), "--steps", "8", "--out", str(tmp_path / "s.png")]) == 2
    assert "an EVAE or VAE has none" in capsys.readouterr().err         # sample --steps did nothing to an EVAE
    for n in ("-1", "0"):
        assert main(["sample", str(tmp_path / "e.safetensors"), "--n", n, "--out", str(tmp_path / "s.png")]) == 2
        assert "--n" in capsys.readouterr().err


def test_precompute_without_data_uses_the_generators_training_data(tmp_path, capsys):
    """`precompute GEN --out DIR` defaulted to Fashion-MNIST whatever the generator was trained on
    (an 8x8 digits generator then made neighbours of 28x28 clothes, with no error); now it takes
    the data the checkpoint records, as `sample` does, and refuses a checkpoint that records none."""
    import json
    gen = tmp_path / "e.safetensors"
    assert main(["train", "--kind", "evae", "--data", "digits", "--limit", "32", "--batch-size", "16",
                 "--stage1-steps", "1", "--quiet", "--work-dir", str(tmp_path / "run"), "--out", str(gen)]) == 0
    assert main(["precompute", str(gen), "--limit", "20", "--quiet", "--out", str(tmp_path / "s")]) == 0
    spec = json.loads((tmp_path / "s" / "manifest.json").read_text())["info"]["data"]
    assert spec["data"] == "digits" and spec["limit"] == 20
    dkgm_aug.EVAE(channels=1, image_size=8, d_z=3, widths=(4, 4, 8, 8)).save(tmp_path / "bare.safetensors")
    assert main(["precompute", str(tmp_path / "bare.safetensors"), "--out", str(tmp_path / "t")]) == 2
    assert "does not record the data it was trained on" in capsys.readouterr().err


def test_a_28x28_gray_generator_saved_from_python_is_not_taken_for_a_fashion_mnist_one(tmp_path, capsys):
    """`sample`, `precompute` and `calibrate` without --data fell back to Fashion-MNIST for any 1x28x28
    checkpoint that records no data: a generator trained from Python on the user's own 28x28 gray
    images (no data_spec) then made a bank of clothes, or was calibrated on them, with no error."""
    gen = tmp_path / "mine.safetensors"
    dkgm_aug.DKGM.from_preset("tiny", image_size=28).save(gen)
    for cmd in (["sample", str(gen), "--out", str(tmp_path / "s.png")],
                ["precompute", str(gen), "--limit", "4", "--quiet", "--out", str(tmp_path / "p")],
                ["calibrate", str(gen), "--out", str(tmp_path / "c.safetensors")]):
        assert main(cmd) == 2, cmd
        assert "does not record the data it was trained on" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "c.safetensors").exists()



def test_a_model_trained_further_in_python_drops_its_warm_starts_data_record(tmp_path, capsys):
    """A shipped digits-tiny fine-tuned on other 8x8 data and saved still said 'sklearn digits train':
    `precompute` without --data built the synthetic set from sklearn digits. The Trainer moves the
    earlier training (and calibration) record under info['warm_start']; the CLI then asks for --data."""
    model = dkgm_aug.load("digits-tiny")
    assert "data_spec" in model.info["training"]
    mine = torch.rand(16, 1, 8, 8)
    dkgm_aug.Trainer(model, mine, out_dir=tmp_path / "w", max_steps=1, batch_size=8, progress=False).fit(stage=1)
    assert "training" not in model.info and "data_spec" in model.info["warm_start"]["training"]
    assert "classes" not in model.info and model.info["warm_start"]["classes"][:2] == ["0", "1"]   # no names here
    named = dkgm_aug.load("digits-tiny")
    data = dkgm_aug.data.ImageDataset((mine * 255).to(torch.uint8), torch.arange(16) % 2, ["odd", "even"])
    dkgm_aug.Trainer(named, data, out_dir=tmp_path / "v", max_steps=1, batch_size=8, progress=False).fit(stage=1)
    assert named.info["classes"] == ["odd", "even"]                 # the names of the data it was trained on
    model.save(tmp_path / "mine.safetensors")
    assert main(["precompute", str(tmp_path / "mine.safetensors"), "--out", str(tmp_path / "s")]) == 2
    assert "--data" in capsys.readouterr().err
