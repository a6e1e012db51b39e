import json

import dkgm_aug
from dkgm_aug.cli import main


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


def test_errors_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.safetensors")]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    assert main(["train", "--data", "nonexistent", "--out", str(tmp_path / "x")]) == 2
