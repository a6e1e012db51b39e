"""Tests for benchmarks/swiss_roll.py (loaded by path: benchmarks is not a package)."""
import csv
import math

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def sr():
    return load_benchmark("swiss_roll")


def test_ground_truth_formula(sr):
    a = 4 * math.pi / 3
    # u = 0 sits at the origin; u = 9/16 gives a*sqrt(u) = pi, radius pi/3, on the -x axis;
    # u = 9/64 gives angle pi/2, radius pi/6, on the +y axis.
    g = sr.ground_truth(torch.tensor([0.0, 9 / 16, 9 / 64], dtype=torch.float64))
    expected = torch.tensor([[0.0, 0.0], [-math.pi / 3, 0.0], [0.0, math.pi / 6]], dtype=torch.float64)
    torch.testing.assert_close(g, expected, atol=1e-12, rtol=0)
    # A generic value against the formula written out by hand.
    u = 2.0
    s = a * math.sqrt(u)
    g = sr.ground_truth(torch.tensor([u], dtype=torch.float64))[0]
    torch.testing.assert_close(g, torch.tensor([s / 3 * math.cos(s), s / 3 * math.sin(s)], dtype=torch.float64))


def test_make_data_is_transformed_ground_truth(sr):
    x_in, x = sr.make_data(64, seed=3)
    assert x_in.shape == x.shape == (64, 2)
    torch.testing.assert_close(x_in, 0.1 * x + 1)
    x_in2, _ = sr.make_data(64, seed=3)
    torch.testing.assert_close(x_in, x_in2)  # seeded: reproducible


def test_debias_hand_computed_k2(sr):
    calls = []

    def net(x, t):
        calls.append((x.clone(), t))
        return {0: torch.tensor([[1.0, 2.0]]), 1: torch.tensor([[3.0, -1.0]]), 2: torch.tensor([[4.0, 6.0]])}[t]

    x_in = torch.tensor([[10.0, 20.0]])
    out = sr.debias(net, x_in, k=2)
    # x0 = (1, 2); x1 = x0 + 1/1 * (3, -1) = (4, 1); x2 = x1 + 1/2 * (4, 6) = (6, 4)
    torch.testing.assert_close(out, torch.tensor([[6.0, 4.0]]))
    # The network sees x_in first, then the residuals x_in - x_hat_{t-1}.
    assert [t for _, t in calls] == [0, 1, 2]
    torch.testing.assert_close(calls[0][0], x_in)
    torch.testing.assert_close(calls[1][0], torch.tensor([[9.0, 18.0]]))
    torch.testing.assert_close(calls[2][0], torch.tensor([[6.0, 19.0]]))


def test_debias_k0_is_single_call(sr):
    out = sr.debias(lambda x, t: x * 0 + t + 5.0, torch.zeros(3, 2), k=0)
    torch.testing.assert_close(out, torch.full((3, 2), 5.0))


def test_model_uses_time_and_copies_are_independent(sr):
    net = sr.make_model(0, restarts=3)
    x = torch.randn(5, 2)
    assert net(x, 0).shape == (3, 5, 2)
    assert not torch.allclose(net(x, 0), net(x, 3))
    # Gradient of copy 0's output reaches only copy 0's weights.
    net(x, 1)[0].sum().backward()
    for p in net.parameters():
        assert p.grad[1:].abs().sum() == 0 and p.grad[0].abs().sum() > 0


def test_quick_main_writes_outputs(sr, tmp_path):
    torch.set_num_threads(1)
    sr.main(["--quick", "--out", str(tmp_path)])
    for name in ("swiss_roll.csv", "swiss_roll.md", "swiss_roll.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "swiss_roll.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["k"]) for r in rows] == [0, 1, 2]
    assert {"k", "train_steps", "test_mse"} <= set(rows[0])
    assert len({r["train_steps"] for r in rows}) == 1
    assert all(math.isfinite(float(r["test_mse"])) and float(r["test_mse"]) >= 0 for r in rows)
    md = (tmp_path / "swiss_roll.md").read_text()
    assert "--quick" in md and "| k |" in md
    assert (tmp_path / "swiss_roll.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
