"""Calibrated knobs: the choice rule on hand-made scores, and the CLI end to end."""
import dkgm_aug
from dkgm_aug.calibrate import choose
from dkgm_aug.cli import main


def row(alpha, steps, sharp, kept):
    return dict(alpha=alpha, steps=steps, sharpness=sharp, label_preservation=kept)


def test_choose_keeps_labels_then_matches_sharpness_then_prefers_diversity():
    real = dict(sharpness=1.0, label_preservation=0.95)
    rows = [row(0.25, 4, 1.0, 0.90),      # perfect sharpness, labels lost beyond the tolerance
            row(0.25, 2, 0.9, 0.94),
            row(0.5, 2, 1.1, 0.93),       # as far from 1 as 0.9, larger alpha: wins the tie
            row(0.5, 4, 1.3, 0.95)]
    chosen = choose(rows, real, tolerance=0.03)
    assert (chosen["alpha"], chosen["steps"], chosen["labels_kept"]) == (0.5, 2, True)
    # a tighter tolerance leaves (0.25, 2) and (0.5, 4): 0.9 is nearer 1 than 1.3
    tight = choose(rows, real, tolerance=0.015)
    assert (tight["alpha"], tight["steps"]) == (0.25, 2)
    none = choose(rows, dict(real, label_preservation=1.0), tolerance=0.0)
    assert none["labels_kept"] is False and none["label_preservation"] == 0.95


def test_a_setting_exactly_on_the_tolerance_is_within_it():
    """0.92 - 0.1 is 0.8200000000000001 in floats: a setting at exactly 0.82 was dropped, and a
    blurrier one chosen in its place, still marked as keeping the labels."""
    real = dict(sharpness=0.18, label_preservation=0.92)
    rows = [row(0.5, 4, 0.18, 0.82), row(0.25, 4, 0.10, 0.86)]
    chosen = choose(rows, real, tolerance=0.1)
    assert (chosen["alpha"], chosen["sharpness"], chosen["labels_kept"]) == (0.5, 0.18, True)


def test_cli_calibrate_writes_the_defaults(tmp_path, capsys):
    out = tmp_path / "cal.safetensors"
    assert main(["calibrate", "digits-tiny", "--data", "digits", "--n", "32", "--out", str(out)]) == 0
    model = dkgm_aug.load(out)
    cal = model.info["calibration"]
    assert (model.alpha, model.steps) == (cal["alpha"], cal["steps"])
    assert len(cal["grid"]) == 35 and cal["data"]["split"] == "train"
    assert "<- chosen" in capsys.readouterr().out


def test_cli_calibrate_needs_an_evaluator_for_other_data(tmp_path, capsys):
    import numpy as np
    np.savez(tmp_path / "d.npz", images=np.zeros((8, 8, 8), np.uint8), labels=np.arange(8) % 2)
    assert main(["calibrate", "digits-tiny", "--data", str(tmp_path / "d.npz"), "--n", "4"]) == 2
    assert "--evaluator" in capsys.readouterr().err


def test_calibrate_refuses_labels_the_evaluator_does_not_use():
    """Labels in another class order than the evaluator's (an image folder named zero..nine sorts
    'eight' first) made the real images' label preservation 0.07, so nearly every setting counted as
    keeping labels; labels beyond the evaluator's classes gave 0.0 and the most label-destroying
    setting, recorded as labels_kept=True. Both are refused now, with the reason."""
    import pytest
    import torch
    from dkgm_aug import DataError
    from dkgm_aug.calibrate import calibrate
    from dkgm_aug.data import ImageDataset, load_dataset
    from dkgm_aug.label_filter import load_evaluator
    digits, evaluator = load_dataset("digits", split="train"), load_evaluator("digits-evaluator")
    model = dkgm_aug.load("digits-tiny")
    grid = dict(n=64, alphas=(0.25,), steps=(2,))
    shuffled = ImageDataset(digits.images, (digits.targets * 3 + 1) % 10)     # another class order
    with pytest.raises(DataError, match=r"evaluator assigns 0\.\d+ of the real images.*class order"):
        calibrate(model, shuffled, evaluator, **grid)
    beyond = ImageDataset(digits.images, digits.targets + 5)
    with pytest.raises(DataError, match=r"labels \[10.*14\].*10 classes"):
        calibrate(model, beyond, evaluator, **grid)
    assert calibrate(model, digits, evaluator, **grid)["real"]["label_preservation"] > 0.9


def test_calibrate_scores_the_images_a_dataset_serves_and_checks_a_conditional_class_order():
    """calibrate (and accuracy, KernelSmoothedScore.from_dataset) read an ImageDataset's raw `images`,
    skipping its transform: a dataset whose transform blacks every image out scored 0.94 accuracy.
    And a class-conditional generator was calibrated on labels it reads as other classes."""
    import pytest
    import torch
    from dkgm_aug import DataError
    from dkgm_aug.calibrate import calibrate
    from dkgm_aug.data import ImageDataset, load_dataset
    from dkgm_aug.features import accuracy
    from dkgm_aug.label_filter import load_evaluator
    digits, evaluator = load_dataset("digits", split="train"), load_evaluator("digits-evaluator")
    blank = ImageDataset(digits.images, digits.targets, digits.classes, transform=torch.zeros_like)
    assert accuracy(evaluator, digits) > 0.9 and accuracy(evaluator, blank) < 0.3
    with pytest.raises(DataError, match="evaluator assigns"):        # black images: no class to keep
        calibrate(dkgm_aug.load("digits-tiny"), blank, evaluator, n=64, alphas=(0.25,), steps=(2,))
    flipped = ImageDataset(digits.images, digits.targets, digits.classes,
                           transform=lambda x: x.flip(-1) if torch.rand(()) < 0.5 else x)
    torch.manual_seed(1)
    first = calibrate(dkgm_aug.load("digits-tiny"), flipped, evaluator, n=32, alphas=(0.25,), steps=(2,))
    torch.manual_seed(2)          # its random draws come from calibrate's seed, not torch's global state
    assert calibrate(dkgm_aug.load("digits-tiny"), flipped, evaluator, n=32, alphas=(0.25,), steps=(2,)) == first
    kss = dkgm_aug.KernelSmoothedScore.from_dataset(
        ImageDataset(digits.images[:20], digits.targets[:20], transform=lambda x: torch.full_like(x, 7 / 255)), t_min=1e-7)
    assert bool((kss.images == 7).all())
    model = dkgm_aug.load("digits-tiny").with_labels(10, stages=(1,))
    model.info["classes"] = ["1", "0"] + [str(i) for i in range(2, 10)]
    with pytest.raises(DataError, match="'0' is index 1 to the generator but 0 here"):
        calibrate(model, digits, evaluator, n=64, alphas=(0.25,), steps=(2,))


def test_cli_sample_refuses_a_conditional_generators_other_class_order(tmp_path, capsys):
    model = dkgm_aug.load("digits-tiny").with_labels(10, stages=(1,))
    model.info["classes"] = ["1", "0"] + [str(i) for i in range(2, 10)]
    path = tmp_path / "c.safetensors"
    model.save(path)
    assert main(["sample", str(path), "--data", "digits", "--n", "2", "--k", "1", "--out", str(tmp_path / "s.png")]) != 0
    assert "'0' is index 1 to the generator" in capsys.readouterr().err


def test_cli_calibrate_writes_beside_its_checkpoint_by_default(tmp_path, monkeypatch):
    """The default output went to the current folder: calibrating runA/gen and runB/gen wrote the
    same ./gen-calibrated.safetensors, and the second silently replaced the first."""
    import shutil
    from dkgm_aug.checkpoint import resolve
    monkeypatch.chdir(tmp_path)
    for run in ("runA", "runB"):
        (tmp_path / run).mkdir()
        shutil.copy(resolve("digits-tiny"), tmp_path / run / "gen.safetensors")
        assert main(["calibrate", f"{run}/gen.safetensors", "--data", "digits", "--n", "16"]) == 0
    assert (tmp_path / "runA" / "gen-calibrated.safetensors").is_file()
    assert (tmp_path / "runB" / "gen-calibrated.safetensors").is_file()
    assert not (tmp_path / "gen-calibrated.safetensors").exists()
