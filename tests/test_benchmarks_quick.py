"""The benchmarks' --quick modes and the README's main job, on small settings."""
import csv
from pathlib import Path

import pytest
import torch

import dkgm_aug
from conftest import load_benchmark
from dkgm_aug.data import FASHION_MNIST_DIR

needs_fmnist = pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Debian package dataset-fashion-mnist not installed (make data)")


def test_shipped_generators_listed_and_loadable():
    names = dkgm_aug.list_pretrained()
    assert {"digits-tiny", "fashion-mnist-tiny", "fashion-mnist-evae"} <= set(names)
    total = sum((Path(dkgm_aug.__file__).parent / "pretrained" / f"{n}.safetensors").stat().st_size for n in names)
    assert total < 25 * 2 ** 20
    for name in names:
        model = dkgm_aug.load(name)
        training = model.info["training"]
        assert training["command"].split()[0] in ("dkgm-aug", "python") and training["wall_time_s"] > 0
        assert len(model.info["classes"]) == 10


def test_model_cards_quick(tmp_path):
    load_benchmark("model_cards").main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "digits-tiny.md").read_text()
    assert "| stage 1 + 2 | 0.5 |" in text and (tmp_path / "digits-tiny.png").stat().st_size > 0


def test_speed_quick(tmp_path):
    import re
    load_benchmark("speed").main(["--quick", "--generator", "digits-tiny", "--threads", "1", "--out", str(tmp_path / "s.md")])
    text = (tmp_path / "s.md").read_text()
    assert "per image" in text and "batched" in text and "RSS +" in text
    for section in ("RandAugment", "DDPM-style", "epoch", "batch size", "image size", "Speed-ups tried on CPU",
                    "### GPU", "Load average", "Command: `python benchmarks/speed.py --quick"):
        assert section in text, section
    for row in ("| DDPM-style, 10 steps | 10 | 4 |", "| (c) DKGMAugment(p=0.5) on the collated batch |",
                "| 16x16 | 256 |", "| bf16 autocast |", "| batched (BCHW) | 16 |",
                "| per batch (`__getitems__`, library) |"):
        assert row in text, row
    ratios = re.findall(r"\| x([^ |]+)", text)     # every ratio cell: "x1.23", "x4.5e-03", "x1 (reference)"
    assert len(ratios) >= 15 and all(0 < float(r) < float("inf") for r in ratios), ratios
    assert (tmp_path / "s.png").stat().st_size > 0


def test_speed_gpu_dry_run_on_cpu(tmp_path):
    load_benchmark("speed_gpu").main(["--quick", "--device", "cpu", "--generator", "digits-tiny",
                                      "--out", str(tmp_path / "g.md")])
    text = (tmp_path / "g.md").read_text()
    assert "a dry run: these are not GPU numbers" in text and "failed" not in text
    for row in ("| batched (BCHW) | 4 |", "| DDPM-style, 5 steps | 5 |", "| 16x16 |", "| fp16 weights (`model.half()`) | 4 |",
                "| (b) DKGMAugment(p=0.5) on the batch, fp32 |"):
        assert row in text, row


def test_throughput_quick(tmp_path):
    load_benchmark("throughput").main(["--sizes", "8", "--iters", "1", "--batch-size", "4", "--out", str(tmp_path / "t.md")])
    assert "| tiny | 8x8 | 2 |" in (tmp_path / "t.md").read_text()


@needs_fmnist
def test_main_job(tmp_path, capsys):
    from dkgm_aug.demo import main
    assert main(["--out", str(tmp_path), "--timed", "4"]) == 0
    out = capsys.readouterr().out
    assert "Ankle boot" in out and "time per synthetic image" in out
    # imbalance ratio 100: the head class keeps 6000 images, the tail 60; "auto" lifts all to 6000
    assert "T-shirt/top     6000    6000" in out and "Ankle boot        60    6000" in out
    assert (tmp_path / "neighbours.png").stat().st_size > 0


def test_kernel_compare_quick(tmp_path):
    load_benchmark("kernel_compare").main(["--quick", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "k.md")])
    text = (tmp_path / "k.md").read_text()
    assert "| gaussian | 0.5 |" in text and "| epanechnikov | 1.0 |" in text


@needs_fmnist
def test_stage2_on_others_quick(tmp_path):
    load_benchmark("stage2_on_others").main(["--quick", "--out", str(tmp_path / "s.md")])
    text = (tmp_path / "s.md").read_text()
    assert text.count("\n| ") == 5 and "EVAE" in text and "kernel-smoothed" in text


@needs_fmnist
def test_shipped_evae_balances_a_long_tailed_split():
    import torch
    from dkgm_aug import BalancedDKGMDataset
    from dkgm_aug.data import fashion_mnist, long_tailed_indices
    test = fashion_mnist(split="test")
    lt = test.subset(long_tailed_indices(test.targets, 10, 0))
    ds = BalancedDKGMDataset(lt, generator="fashion-mnist-evae", progress=False)
    assert set(ds.class_counts.values()) == {1000}
    x, y = ds[len(ds) - 1]
    src = lt[ds.source_index(len(ds) - 1)]
    assert y == src[1] and x.shape == (1, 28, 28) and not torch.equal(x, src[0])


def test_train_evaluator_quick(tmp_path):
    import csv
    from dkgm_aug.features import load_feature_net
    assert load_benchmark("train_evaluator").main(["--data", "digits", "--quick", "--out", str(tmp_path)]) == 0
    net = load_feature_net(tmp_path / "evaluator_digits.safetensors")
    ev = net.info["evaluator"]
    assert ev["data"] == "digits" and 0 <= ev["test_accuracy"] <= 1 and "--quick" in ev["command"]
    with open(tmp_path / "evaluator_digits.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]


def test_shipped_evaluators_meet_their_bar():
    """The yardsticks: >= 0.98 test accuracy on digits, >= 0.92 on Fashion-MNIST (issue 11)."""
    from dkgm_aug.label_filter import list_evaluators, load_evaluator
    bars = {"digits-evaluator": 0.98, "fashion-mnist-evaluator": 0.92}
    for name in list_evaluators():
        assert load_evaluator(name).info["evaluator"]["test_accuracy"] >= bars[name], name
    assert "digits-evaluator" in list_evaluators()


def test_training_budget_quick(tmp_path):
    import csv
    mod = load_benchmark("training_budget")
    evaluator = str(Path(dkgm_aug.__file__).parent / "pretrained" / "evaluators" / "digits-evaluator.safetensors")
    assert mod.main(["--quick", "--evaluator", evaluator, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "budget_tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["stage"], r["step"]) for r in rows] == [("real", "0"), ("held-out", "0"), ("stage 1", "2"),
                                                        ("stage 1", "4"), ("stage 2", "2")]
    assert mod.main(["--quick", "--evaluator", evaluator, "--out", str(tmp_path)]) == 0   # resumes: nothing added
    with open(tmp_path / "budget_tiny.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert dkgm_aug.load(tmp_path / "digits-tiny-budget.safetensors").info["training"]["stage1_steps"] == 4


def test_gpu_generator_dry_run_on_cpu(tmp_path):
    assert load_benchmark("gpu_generator").main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    model = dkgm_aug.load(tmp_path / "digits-tiny-gpu.safetensors")
    assert model.info["training"]["stage1_steps"] >= 2 and "calibration" in model.info
    assert (tmp_path / "quality.csv").read_text().count("\n") == 4


def test_gpu_generator_stops_a_stage_at_its_step_cap():
    """--stage1-steps / --stage2-steps: a fixed budget (a control run of the same length) stops at
    the cap, the last chunk cut short; without a cap, the time budget alone stops it."""
    class Fake:
        def __init__(self):
            self.calls = []

        def fit(self, stage, max_steps):
            self.calls.append(max_steps)
    train_for, t = load_benchmark("gpu_generator").train_for, Fake()
    assert train_for(t, 1, 60.0, 3, cap=7) == 7 and t.calls == [3, 6, 7]
    t = Fake()
    assert train_for(t, 1, 0.0, 3) == 3 and t.calls == [3]


def test_silent_cases_all_pass(tmp_path):
    """Issue 12's replay: every silent-wrong-result case raises a clear error or gives the right result."""
    assert load_benchmark("silent_cases").main(["--out", str(tmp_path / "s.md")]) == 0


def test_training_budget_rescore_reads_snapshots(tmp_path):
    mod = load_benchmark("training_budget")
    evaluator = str(Path(dkgm_aug.__file__).parent / "pretrained" / "evaluators" / "digits-evaluator.safetensors")
    assert mod.main(["--quick", "--evaluator", evaluator, "--out", str(tmp_path)]) == 0
    first = (tmp_path / "budget_tiny.csv").read_text()
    assert mod.main(["--quick", "--rescore", "--evaluator", evaluator, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "budget_tiny.csv").read_text() == first     # same snapshots, same yardstick: same scores


def test_trainer_overhead_quick(tmp_path):
    assert load_benchmark("trainer_overhead").main(["--quick", "--out", str(tmp_path / "t.md")]) == 0
    rows = [r for r in (tmp_path / "t.md").read_text().splitlines() if r.startswith("| 1 ") or r.startswith("| 2 ")]
    assert len(rows) == 2 and all(float(r.split("|")[5]) > 0 for r in rows)


def test_classifier_speed_quick(tmp_path):
    assert load_benchmark("classifier_speed").main(["--quick", "--out", str(tmp_path / "c.md")]) == 0
    assert (tmp_path / "c.md").read_text().count("| resnet10t |") == 2


@needs_fmnist
def test_bank_speed_quick(tmp_path):
    import csv
    assert load_benchmark("bank_speed").main(["--quick", "--out", str(tmp_path / "b")]) == 0
    text = (tmp_path / "b.md").read_text()
    for row in ("| (a) no augmentation |", "| (b) RandAugment per item", "| (c) DKGMAugment(p=0.5) on the collated batch |",
                "| (d) DKGMAugment(p=0.5) per item", "| (e) BankAugment(p=0.5, k=2) per item", "| 1 |", "| 2 |"):
        assert row in text, row
    assert "took" in text and ("within the 1.3x target" in text or "OVER the 1.3x target" in text)
    with open(tmp_path / "b.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["table"] for r in rows] == ["epoch"] * 5 + ["bank build", "k", "k"]
    assert all(float(r["seconds"]) > 0 for r in rows)
    assert [float(r["spread"]) > 0 for r in rows if r["table"] == "k"] == [False, True]   # k=1: one neighbour


def test_gpu_generator_fine_tunes_a_conditional_stage_1(tmp_path):
    """--init + --conditional: stage 1 gains a label pathway; stage 2 (0 minutes) is the init's, untouched."""
    argv = ["--device", "cpu", "--quick", "--init", "digits-tiny", "--conditional", "--conditional-stages", "1",
            "--stage2-minutes", "0", "--calibrate-alphas", "0.5", "--calibrate-steps", "2", "--out", str(tmp_path)]
    assert load_benchmark("gpu_generator").main(argv) == 0
    model, init = dkgm_aug.load(tmp_path / "digits-tiny-gpu.safetensors"), dkgm_aug.load("digits-tiny")
    assert model.conditional and model.stage1.config.num_classes == 10 and model.stage2.config.num_classes == 0
    assert model.info["training"]["stage1_steps"] >= 2 and model.info["training"]["stage2_steps"] == 0
    assert all(torch.equal(v, init.stage2.state_dict()[k]) for k, v in model.stage2.state_dict().items())
    assert model.info["calibration"]["alpha"] == 0.5 and model.info["init"] == "digits-tiny"


def test_class_fidelity_scores_every_class(tmp_path):
    out = tmp_path / "cf.csv"
    assert load_benchmark("class_fidelity").main(["--data", "digits", "--evaluator", "digits-evaluator", "--generators",
                                                  "digits-tiny", "--per-class", "3", "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    m = dkgm_aug.load("digits-tiny")   # each generator at its own calibrated knobs
    assert [r["what"] for r in rows] == ["real sources", f"digits-tiny (alpha {m.alpha}, steps {m.steps})"]
    assert len(rows[0]) == 12 and all(0 <= float(v) <= 1 for r in rows for k, v in r.items() if k != "what")


def test_class_fidelity_wrong_labels_for_a_conditional_generator(tmp_path):
    gen, out = tmp_path / "cond.safetensors", tmp_path / "cf.csv"
    dkgm_aug.load("digits-tiny").with_labels(10, stages=(1,)).save(gen)
    assert load_benchmark("class_fidelity").main(["--data", "digits", "--evaluator", "digits-evaluator", "--generators",
                                                  str(gen), "--wrong-labels", "--per-class", "2", "--out", str(out)]) == 0
    with open(out) as f:
        rows = {r["what"]: r for r in csv.DictReader(f)}
    m = dkgm_aug.load(gen)
    name = f"cond (alpha {m.alpha}, steps {m.steps})"
    # with_labels starts as the unconditional function: the label given changes nothing yet
    assert rows[f"{name}, given label + 1: in the source's class"]["all"] == rows[name]["all"]
    assert float(rows[f"{name}, given label + 1: in the given class"]["all"]) < 0.5
