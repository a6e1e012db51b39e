"""benchmarks/imbalanced.py: metric helpers on hand-made examples, and the --quick run end to end."""
import csv

import numpy as np
import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def imb():
    return load_benchmark("imbalanced")


def test_tail_classes_are_the_rarest_third(imb):
    counts = [100, 70, 50, 35, 25, 18, 13, 9, 6, 3]     # long-tailed, largest first
    assert imb.tail_classes(counts) == [7, 8, 9]
    assert imb.tail_classes([5, 1, 9, 2, 8, 3]) == [1, 3]   # order does not matter, 6 classes -> 2
    assert imb.tail_classes([4, 4]) == [0]                    # at least one; ties by index


def test_metrics_on_a_known_confusion(imb):
    # 3 classes, 4 test items each; class 2 is the tail. Class 0: all right; class 1: 3/4;
    # class 2: 1/4 (two predicted as 0, one as 1).
    y_true = [0] * 4 + [1] * 4 + [2] * 4
    y_pred = [0, 0, 0, 0, 1, 1, 1, 0, 2, 0, 0, 1]
    np.testing.assert_allclose(imb.per_class_recall(y_true, y_pred, 3), [1.0, 0.75, 0.25])
    m = imb.metrics(y_true, y_pred, 3, tail=[2])
    assert m["accuracy"] == pytest.approx(8 / 12)
    assert m["tail_recall"] == pytest.approx(0.25)
    # F1 per class: 0: p=4/7, r=1 -> 8/11; 1: p=3/4, r=3/4 -> 3/4; 2: p=1, r=1/4 -> 2/5
    assert m["macro_f1"] == pytest.approx((8 / 11 + 3 / 4 + 2 / 5) / 3)
    assert imb.metrics(y_true, y_pred, 3, tail=[1, 2])["tail_recall"] == pytest.approx(0.5)
    assert m["class_recall"] == "1.0000;0.7500;0.2500"


def test_csv_from_an_older_version_gains_the_new_columns(imb, tmp_path):
    path = tmp_path / "runs.csv"
    old_fields = [f for f in imb.FIELDS if f not in ("class_recall", "dkgm_p")]   # as the previous version wrote
    path.write_text(",".join(old_fields) + "\n" + ",".join("ce" if f == "method" else "0" for f in old_fields) + "\n")
    imb.append_row(path, dict.fromkeys(imb.FIELDS, 1) | dict(method="ros", class_recall="0.5;0.5"))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == imb.FIELDS
    assert [(r["method"], r["class_recall"]) for r in rows] == [("ce", ""), ("ros", "0.5;0.5")]
    # the old row, made before --dkgm-p existed (p was 0.5), matches p=0.5 and not p=0.25
    cfg = dict(data="0", model="0")
    assert [r["method"] for r in imb.read_rows(path, cfg | dict(dkgm_p=0.5))] == ["ce"]
    assert imb.read_rows(path, cfg | dict(dkgm_p=0.25)) == []


def test_class_balanced_weights_favour_rare_classes(imb):
    w = imb.class_balanced_weights([100, 10, 1])
    assert w.sum().item() == pytest.approx(3.0)
    assert w[0] < w[1] < w[2]
    assert torch.allclose(imb.class_balanced_weights([7, 7, 7]), torch.ones(3))


def test_random_shift_keeps_shape_and_content(imb):
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    y = imb.random_shift(x, 1, g)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(imb.random_shift(x, 0, g), x)


def test_quick_run_writes_csv_table_and_plot(imb, tmp_path):
    assert imb.main(["--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == list(imb.METHODS)     # all methods, one seed
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and 0.0 <= float(r["tail_recall"]) <= 1.0
    by_method = {r["method"]: r for r in rows}
    for m in imb.BALANCED:
        assert int(by_method[m]["n_pool"]) > int(by_method["ce"]["n_pool"])   # synthetic items added
        assert 0 < int(by_method[m]["n_generated"]) <= int(by_method[m]["n_pool"]) - int(by_method[m]["n_train"])
    assert int(by_method["smote"]["n_pool"]) == int(by_method["dkgm_balanced"]["n_pool"])  # both balance to max
    assert int(by_method["dkgm_augment"]["n_generated"]) > 0                                # the transform ran
    assert int(by_method["ros_dkgm"]["n_generated"]) > 0 and by_method["ros_dkgm"]["n_pool"] == by_method["ros"]["n_pool"]
    text = (tmp_path / "results.md").read_text()
    assert "--quick" in text and "| dkgm_augment |" in text and "| kss_balanced |" in text
    assert "threads per run: 1" in text and "trained on: sklearn digits" in text
    assert "Recall per class" in text and text.count("| dkgm_balanced |") == 2    # summary and per class
    assert (tmp_path / "results.png").stat().st_size > 0


def test_rows_accumulate_and_settings_do_not_mix(imb, tmp_path):
    """Rows are appended as runs end; a rerun of a (method, seed) replaces the old row, and
    rows made with other settings are left out of the table."""
    args = imb.argparse.Namespace(data="digits", rho=10.0, split_seed=0, model="m", steps=5, batch=4, generator=None,
                                  evae=None, evae_epochs=1, kss_h=1.0, kss_steps=2, dkgm_p=0.5)
    cfg = imb.config_of(args)
    base = dict.fromkeys(imb.FIELDS, 0) | cfg
    path = tmp_path / "runs.csv"
    imb.append_row(path, base | dict(method="ce", seed=0, accuracy=0.5))
    imb.append_row(path, base | dict(method="ros", seed=0, accuracy=0.6))
    imb.append_row(path, base | dict(method="ce", seed=0, accuracy=0.7))            # rerun replaces
    imb.append_row(path, base | dict(method="ce", seed=1, accuracy=0.9, steps=99))  # other settings
    rows = imb.read_rows(path, cfg)
    assert [(r["method"], r["seed"], r["accuracy"]) for r in rows] == [("ce", 0, 0.7), ("ros", 0, 0.6)]
    assert path.read_text().count("\n") == 5   # header + 4 rows: nothing rewritten


def test_export_split_round_trips_through_the_npz_loader(imb, tmp_path):
    from dkgm_aug.data import load_dataset
    path = tmp_path / "lt.npz"
    assert imb.main(["--data", "digits", "--rho", "10", "--split-seed", "3", "--export-split", str(path)]) == 0
    lt, _ = imb.load("digits", 10, 3)
    back = load_dataset(path)
    assert torch.equal(back.images, lt.images) and torch.equal(back.targets, lt.targets)


def test_tail_memorisation_quick(tmp_path):
    """The tail-class novelty check runs, and its rows are shares in [0, 1] and distances >= 0."""
    load_benchmark("tail_memorisation").main(["--quick", "--out", str(tmp_path / "t.md")])
    rows = [r.split("|")[1:-1] for r in (tmp_path / "t.md").read_text().splitlines() if r.startswith("| ")][1:]
    rows = [r for r in rows if not r[0].startswith("---")]
    assert {r[0].strip().split()[0] for r in rows} == {"DKGM", "kernel-smoothed", "real"}
    assert len(rows) == 3 * 3     # 3 sources x 3 tail classes
    for r in rows:
        assert 0.0 <= float(r[3]) <= 1.0 and float(r[4]) >= 0.0
