"""benchmarks/generator_quality.py: the --quick report, and the metric helpers it is built on."""
import csv
import math

import pytest
import torch

from conftest import load_benchmark
from dkgm_aug.data import digits
from dkgm_aug.images import to_model


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("generator_quality")


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("generator_quality")
    bench.main(["--quick", "--out", str(out)])
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, (out / "results.md").read_text(), rows


def test_quick_report_has_every_table(quick):
    out, text, rows = quick
    assert "Command: `" in text and "--quick" in text and "wall time" in text and "not FID" in text
    assert "test accuracy 0." in text or "test accuracy 1." in text
    for row in ("| digits-tiny | digits | 0.5 |", "| digits | training sources (copies) | 64 |",
                "| digits | held-out test images | 64 |", "| stage 1 only |", "| b = 0.5, 10 steps x 32 |",
                "| b ~ U[0.5, 1], 10 steps x 32 |"):
        assert row in text, row
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert {r["section"] for r in rows} == {"real", "generator", "bandwidth"}


def test_quick_numbers_are_finite_and_in_range(quick):
    _, _, rows = quick
    for r in rows:
        for key in ("sharpness", "frechet_distance", "label_preservation"):
            assert math.isfinite(float(r[key])) and float(r[key]) >= 0, (r, key)
        assert 0 <= float(r["label_preservation"]) <= 1
        if r["memorisation"]:
            assert 0 <= float(r["memorisation"]) <= 1 and math.isfinite(float(r["nn_distance"]))


def test_quick_calibration_and_stage2_direction(quick):
    _, _, rows = quick
    copies, held = (next(r for r in rows if r["generator"] == name)
                    for name in ("training sources (copies)", "held-out test images"))
    assert float(copies["memorisation"]) == 1.0 and float(copies["nn_distance"]) == pytest.approx(0, abs=1e-6)
    assert float(held["memorisation"]) < 0.5 and float(held["nn_distance"]) > 0.5
    assert float(held["label_preservation"]) > 0.9          # the classifier is worth its features
    gen = {r["stage"]: r for r in rows if r["section"] == "generator"}
    assert float(gen["stage 1+2"]["sharpness"]) > float(gen["stage 1"]["sharpness"])   # the paper's claim


def test_novelty_flags_copies_and_not_noise(bench):
    train = digits(split="train").images
    copies = to_model(train[:20].float() / 255)
    mem, nn = bench.novelty(copies, train)
    assert mem == 1.0 and nn == pytest.approx(0, abs=1e-6)
    noise = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mem, nn = bench.novelty(noise, train)
    assert mem == 0.0 and nn > 2.0


def test_label_preservation_follows_the_labels(bench):
    test = digits(split="test")
    net, _ = bench.yardstick("digits")
    x = to_model(test.images[:100].float() / 255)
    ref = bench.features(net, test.images[100:200])
    _, fd_real, right = bench.scores(net, x, test.targets[:100], ref)
    _, fd_flat, wrong = bench.scores(net, torch.zeros_like(x), (test.targets[:100] + 1) % 10, ref)
    assert right > 0.9 and wrong < 0.3
    assert fd_flat > 5 * fd_real


def test_label_preservation_refuses_labels_that_would_broadcast(bench):
    """Labels shaped [N, 1] broadcast against the N predictions to [N, N]: the share came out
    wrong with no error. They are refused."""
    from dkgm_aug import DataError
    from dkgm_aug.features import neighbour_quality
    test = digits(split="test")
    net, _ = bench.yardstick("digits")
    x01 = test.images[:20].float() / 255
    ref = bench.features(net, test.images[100:200])
    good = neighbour_quality(net, x01, test.targets[:20], ref)["label_preservation"]
    assert good > 0.9
    with pytest.raises(DataError, match=r"labels must be 1-D, one per image \(20\), got shape \(20, 1\)"):
        neighbour_quality(net, x01, test.targets[:20, None], ref)
