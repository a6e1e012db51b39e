"""benchmarks/imbalanced.py and its lt_* modules: metric, loss and CSV helpers on hand-made examples,
the online augmenter's inputs, and the --quick run end to end."""
import argparse
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_benchmark


def _benchmark(fixture: str, module: str):
    """A module-scoped fixture ``fixture`` that loads ``benchmarks/<module>.py``."""
    return pytest.fixture(scope="module", name=fixture)(lambda: load_benchmark(module))


imb = _benchmark("imb", "imbalanced")
common, lt_losses, lt_data, lt_records, lt_run = (
    _benchmark(name, name) for name in ("common", "lt_losses", "lt_data", "lt_records", "lt_run"))


def test_tail_classes_are_the_rarest_third(common):
    counts = [100, 70, 50, 35, 25, 18, 13, 9, 6, 3]     # long-tailed, largest first
    assert common.tail_classes(counts) == [7, 8, 9]
    assert common.tail_classes([5, 1, 9, 2, 8, 3]) == [1, 3]   # order does not matter, 6 classes -> 2
    assert common.tail_classes([4, 9]) == [0]                    # at least one
    # ties with the last tail class are tail too: a step profile's rare half (they were cut by index to [5, 6, 7])
    assert common.tail_classes([5400] * 5 + [54] * 5) == [5, 6, 7, 8, 9]
    assert common.tail_classes([4, 4]) == [0, 1]


def test_a_report_recomputes_tail_recall_from_the_per_class_recall(lt_records, tmp_path):
    """Rows written with another tail definition are reported with the report's own."""
    import csv
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=lt_records.FIELDS)
        w.writeheader()
        w.writerow({k: "" for k in lt_records.FIELDS} | dict(
            method="ce", seed=0, accuracy=0.5, macro_f1=0.5, tail_recall=0.9, train_s=1, setup_s=0, generate_s=0,
            n_generated=0, class_recall=";".join(["1.0"] * 5 + ["0.2", "0.4", "0.6", "0.8", "1.0"])))
    assert lt_records.read_rows(path, {})[0]["tail_recall"] == 0.9
    assert lt_records.read_rows(path, {}, tail=[5, 6, 7, 8, 9])[0]["tail_recall"] == pytest.approx(0.6)


def test_metrics_on_a_known_confusion(lt_run):
    # 3 classes, 4 test items each; class 2 is the tail. Class 0: all right; class 1: 3/4;
    # class 2: 1/4 (two predicted as 0, one as 1).
    y_true = [0] * 4 + [1] * 4 + [2] * 4
    y_pred = [0, 0, 0, 0, 1, 1, 1, 0, 2, 0, 0, 1]
    np.testing.assert_allclose(lt_run.per_class_recall(y_true, y_pred, 3), [1.0, 0.75, 0.25])
    m = lt_run.metrics(y_true, y_pred, 3, tail=[2])
    assert m["accuracy"] == pytest.approx(8 / 12)
    assert m["tail_recall"] == pytest.approx(0.25)
    # F1 per class: 0: p=4/7, r=1 -> 8/11; 1: p=3/4, r=3/4 -> 3/4; 2: p=1, r=1/4 -> 2/5
    assert m["macro_f1"] == pytest.approx((8 / 11 + 3 / 4 + 2 / 5) / 3)
    assert lt_run.metrics(y_true, y_pred, 3, tail=[1, 2])["tail_recall"] == pytest.approx(0.5)
    assert m["class_recall"] == "1.0000;0.7500;0.2500"


def test_csv_from_an_older_version_gains_the_new_columns(lt_records, tmp_path):
    path = tmp_path / "runs.csv"
    old_fields = [f for f in lt_records.FIELDS if f not in ("class_recall", "dkgm_p")]   # as the previous version wrote
    path.write_text(",".join(old_fields) + "\n" + ",".join("ce" if f == "method" else "0" for f in old_fields) + "\n")
    lt_records.append_row(path, dict.fromkeys(lt_records.FIELDS, 1) | dict(method="ros", class_recall="0.5;0.5"))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == lt_records.FIELDS
    assert [(r["method"], r["class_recall"]) for r in rows] == [("ce", ""), ("ros", "0.5;0.5")]
    # the old row, made before --dkgm-p existed (p was 0.5), matches p=0.5 and not p=0.25
    cfg = dict(data="0", model="0")
    assert [r["method"] for r in lt_records.read_rows(path, cfg | dict(dkgm_p=0.5))] == ["ce"]
    assert lt_records.read_rows(path, cfg | dict(dkgm_p=0.25)) == []


def test_class_balanced_weights_favour_rare_classes(lt_losses):
    w = lt_losses.class_balanced_weights([100, 10, 1])
    assert w.sum().item() == pytest.approx(3.0)
    assert w[0] < w[1] < w[2]
    assert torch.allclose(lt_losses.class_balanced_weights([7, 7, 7]), torch.ones(3))


def test_random_shift_keeps_shape_and_content(lt_data):
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    y = lt_data.random_shift(x, 1, g)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(lt_data.random_shift(x, 0, g), x)


def test_online_augmenter_gives_dkgm_augment_each_minority_images_label(lt_data, monkeypatch):
    """The online DKGMAugment gets the minority images with their own labels as a second input
    (a class-conditional generator needs them) and returns (images, labels); the largest class
    is left alone."""
    class Recorder:     # stands in for DKGMAugment: records its inputs, inverts the images
        label_filter = None

        def __init__(self):
            self.calls = []

        def __call__(self, images, labels=None):
            self.calls.append((images.clone(), labels))
            return 255 - images, labels
    recorder = Recorder()
    monkeypatch.setattr(lt_data, "DKGMAugment", lambda *a, **k: recorder)
    args = argparse.Namespace(shift=0, bank=0, generator="unused", data="digits", dkgm_p=1.0, device="cpu",
                              label_filter=None, dkgm_alpha=None, dkgm_steps=None)
    aug = lt_data.Augmenter("dkgm_augment", args, None, torch.tensor([5, 3, 2]), seed=0)
    x = torch.arange(6 * 4, dtype=torch.uint8).reshape(6, 1, 2, 2)    # six different images
    y = torch.tensor([2, 0, 1, 0, 1, 2])
    out = aug(x.clone(), y, torch.Generator().manual_seed(0))
    minority = y != 0
    [(images, labels)] = recorder.calls
    assert torch.equal(images, x[minority])
    assert labels is not None and labels.dtype == torch.int64 and labels.tolist() == [2, 1, 1, 2]
    assert torch.equal(out[minority], 255 - x[minority]) and torch.equal(out[~minority], x[~minority])
    assert aug.n_changed == 4


def test_dkgm_alpha_is_a_knob_that_reaches_the_generator(lt_data, lt_records, monkeypatch):
    """--dkgm-alpha goes to DKGMAugment (and is shown among the knobs); without it, the generator's own."""
    made = []
    monkeypatch.setattr(lt_data, "DKGMAugment", lambda *a, **k: made.append(k) or None)
    args = argparse.Namespace(shift=0, bank=0, generator="g.safetensors", data="digits", dkgm_p=0.5, device="cpu",
                              label_filter=None, dkgm_alpha=0.75, dkgm_steps=None, combine_loss="balanced_softmax", la_tau=1.0)
    lt_data.Augmenter("ros_dkgm", args, None, torch.tensor([5, 3, 2]), seed=0)
    assert made[-1]["alpha"] == 0.75
    assert "dkgm_alpha=0.75" in lt_records.knobs_of("ros_dkgm", args)
    args.dkgm_alpha = None
    lt_data.Augmenter("ros_dkgm", args, None, torch.tensor([5, 3, 2]), seed=0)
    assert made[-1]["alpha"] is None and "dkgm_alpha" not in lt_records.knobs_of("ros_dkgm", args)


def test_dkgm_steps_is_a_knob_that_reaches_the_generator_and_the_bank(lt_data, lt_records, monkeypatch):
    """--dkgm-steps (0: stage-1 neighbours only) goes to DKGMAugment and to the neighbour bank, whose
    folder it names, and is shown among the knobs; without it, the generator's own steps."""
    made, banks = [], []
    monkeypatch.setattr(lt_data, "DKGMAugment", lambda *a, **k: made.append(k) or None)
    args = argparse.Namespace(shift=0, bank=0, generator="g.safetensors", data="digits", dkgm_p=0.5, device="cpu",
                              label_filter=None, dkgm_alpha=None, dkgm_steps=0, combine_loss="balanced_softmax",
                              la_tau=1.0)
    lt_data.Augmenter("ros_dkgm", args, None, torch.tensor([5, 3, 2]), seed=0)
    assert made[-1]["steps"] == 0
    assert "dkgm_steps=0" in lt_records.knobs_of("ros_dkgm", args)
    args.drw_start = 0.8
    assert lt_records.parse_knobs(lt_records.knobs_of("dkgm_deferred", args))["dkgm_steps"] == "0"

    class Bank:
        def __init__(self, *a, **k):
            banks.append(k)

        def build(self, progress):
            return self
    monkeypatch.setattr("dkgm_aug.NeighbourBank", Bank)
    monkeypatch.setattr(lt_data, "generator_for", lambda *a: "g.safetensors")
    lt = argparse.Namespace(targets=torch.tensor([0, 1, 1]))
    args.bank, args.out, args.quick = 2, "out", True
    lt_data.neighbour_bank(args, lt, torch.tensor([False, True]))
    assert banks[-1]["steps"] == 0 and str(banks[-1]["path"]).endswith("g-k2-steps0")
    args.dkgm_steps, args.bank = None, 0
    lt_data.Augmenter("ros_dkgm", args, None, torch.tensor([5, 3, 2]), seed=0)
    assert made[-1]["steps"] is None and "dkgm_steps" not in lt_records.knobs_of("ros_dkgm", args)


def test_quick_run_writes_csv_table_and_plot(imb, lt_losses, tmp_path):
    assert imb.main(["--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == list(lt_losses.METHODS)     # all methods, one seed
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and 0.0 <= float(r["tail_recall"]) <= 1.0
    by_method = {r["method"]: r for r in rows}
    for m in lt_losses.BALANCED:
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


def test_rows_accumulate_and_settings_do_not_mix(lt_records, tmp_path):
    """Rows are appended as runs end; a rerun of a (method, seed) replaces the old row, and
    rows made with other settings are left out of the table."""
    args = argparse.Namespace(data="digits", rho=10.0, split_seed=0, model="m", steps=5, batch=4, generator=None,
                              evae=None, evae_epochs=1, evae_dz=32, kss_h=1.0, kss_steps=2, dkgm_p=0.5,
                              class_order="natural", profile="exp", channels=None, lr=1e-3, weight_decay=1e-4,
                              shift=1, size=32)
    cfg = lt_records.config_of(args)
    base = dict.fromkeys(lt_records.FIELDS, 0) | cfg
    path = tmp_path / "runs.csv"
    lt_records.append_row(path, base | dict(method="ce", seed=0, accuracy=0.5))
    lt_records.append_row(path, base | dict(method="ros", seed=0, accuracy=0.6))
    lt_records.append_row(path, base | dict(method="ce", seed=0, accuracy=0.7))            # rerun replaces
    lt_records.append_row(path, base | dict(method="ce", seed=1, accuracy=0.9, steps=99))  # other settings
    # settings that change training but were once left out of the rows' settings
    for other in (dict(weight_decay=0.05), dict(shift=0), dict(size=16), dict(lr=0.1), dict(profile="step"),
                  dict(class_order="reversed"), dict(channels="16 16 16 16")):
        lt_records.append_row(path, base | dict(method="ros", seed=1, accuracy=0.1) | other)
        assert lt_records.config_of(argparse.Namespace(**{**vars(args), **other,
                                                          "channels": [16] * 4 if "channels" in other else None})) != cfg
    rows = lt_records.read_rows(path, cfg)
    assert [(r["method"], r["seed"], r["accuracy"]) for r in rows] == [("ce", 0, 0.7), ("ros", 0, 0.6)]
    assert path.read_text().count("\n") == 12   # header + 11 rows: nothing rewritten


def test_rows_from_before_a_setting_was_recorded_read_as_its_old_default(lt_records, tmp_path):
    """A runs.csv written before weight decay, shift, size (and once lr, profile, class order) were
    recorded is rewritten with the new columns on the next append, every row kept, and its rows
    count as made with the values every earlier command used."""
    args = argparse.Namespace(data="digits", rho=10.0, split_seed=0, model="m", steps=5, batch=4, generator=None,
                              evae=None, evae_epochs=1, evae_dz=32, kss_h=1.0, kss_steps=2, dkgm_p=0.5,
                              class_order="natural", profile="exp", channels=None, lr=1e-3, weight_decay=1e-4,
                              shift=1, size=32)
    cfg = lt_records.config_of(args)
    old_fields = [f for f in lt_records.FIELDS if f not in ("weight_decay", "shift", "size", "lr", "profile",
                                                            "class_order")]
    path = tmp_path / "runs.csv"
    old = dict.fromkeys(old_fields, 0) | {k: v for k, v in cfg.items() if k in old_fields}
    lt_records.locked_append(path, old_fields, [old | dict(method="ce", seed=0, accuracy=0.5)])
    lt_records.append_row(path, dict.fromkeys(lt_records.FIELDS, 0) | cfg | dict(method="ros", seed=0, accuracy=0.6))
    with open(path) as f:
        assert next(csv.reader(f)) == lt_records.FIELDS
    rows = lt_records.read_rows(path, cfg)
    assert [(r["method"], r["accuracy"]) for r in rows] == [("ce", 0.5), ("ros", 0.6)]
    assert not lt_records.read_rows(path, lt_records.config_of(argparse.Namespace(**{**vars(args), "shift": 2})))


def test_export_split_round_trips_through_the_npz_loader(imb, common, tmp_path):
    from dkgm_aug.data import load_dataset
    path = tmp_path / "lt.npz"
    assert imb.main(["--data", "digits", "--rho", "10", "--split-seed", "3", "--export-split", str(path)]) == 0
    lt, _ = common.long_tailed_split("digits", 10, 3)
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


def test_help_lists_the_converged_protocol(imb, capsys):
    with pytest.raises(SystemExit):
        imb.main(["--help"])
    text = capsys.readouterr().out
    for word in ("ldam_drw", "balanced_softmax", "mixup_drw", "loss_dkgm", "dkgm_deferred", "drs", "--class-order",
                 "--val-fraction", "--profile", "step", "--epochs"):
        assert word in text, word


def test_loss_side_methods_on_known_logits(lt_losses):
    args = argparse.Namespace(drw_start=0.5, ldam_margin=0.5, ldam_s=1.0, la_tau=1.0)
    counts, logits, y = [90, 9, 1], torch.zeros(3, 3), torch.tensor([0, 1, 2])
    ce = F.cross_entropy(logits, y)
    assert lt_losses.loss_fn("ce", logits, y, counts, 0.9, args) == pytest.approx(ce.item())
    # DRW: plain before the switch, class-balanced after it (the rare classes' losses weigh more)
    skewed = torch.tensor([[3.0, 0, 0], [0, 0, 0], [0, 0, 0]])   # item 0 is easy, items 1 and 2 are not
    plain = F.cross_entropy(skewed, y).item()
    assert lt_losses.loss_fn("drw", skewed, y, counts, 0.1, args) == pytest.approx(plain)
    assert lt_losses.loss_fn("drw", skewed, y, counts, 0.9, args).item() > plain
    # LDAM: the rarest class gets the largest margin, and margins shrink as n^(-1/4)
    m = lt_losses.ldam_margins(counts, 0.5)
    assert m[2] == pytest.approx(0.5) and m[0] < m[1] < m[2] and m[1] / m[0] == pytest.approx(10 ** 0.25)
    # Balanced Softmax: equal logits become the log prior, so the head class is favoured in training
    bs = lt_losses.loss_fn("balanced_softmax", logits, torch.tensor([0]).repeat(3), counts, 0.5, args)
    assert bs.item() == pytest.approx(-torch.log(torch.tensor(0.9)).item(), rel=1e-5)
    mixed, (lam, y_b) = lt_losses.mixup(torch.ones(4, 1, 2, 2), torch.arange(4), 1.0, torch.Generator().manual_seed(0))
    assert 0 <= lam <= 1 and sorted(y_b.tolist()) == [0, 1, 2, 3] and torch.allclose(mixed, torch.ones(4, 1, 2, 2))


def test_validation_split_is_long_tailed_and_disjoint(common, lt_data):
    lt, _ = common.long_tailed_split("digits", 10, 0)
    fit, val = lt_data.validation_split(lt, 0.1, 0)
    assert len(fit) + len(val) == len(lt)
    counts_val = torch.bincount(val.targets, minlength=10)
    assert (counts_val >= 1).all() and counts_val[0] > counts_val[9]


def test_converged_quick_run_chooses_the_epoch_on_validation(imb, tmp_path):
    assert imb.main(["--quick", "--epochs", "2", "--methods", "ce", "ldam_drw", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["chosen_epoch"] for r in rows} <= {"1", "2"} and all(float(r["val_bacc"]) > 0 for r in rows)
    with open(tmp_path / "curves.csv") as f:
        assert len(list(csv.DictReader(f))) == 4        # 2 methods x 2 epochs
    text = (tmp_path / "results.md").read_text()
    assert "best validation epoch" in text and "vs best (paired)" in text and (tmp_path / "curves.png").exists()
    # a second variant of ldam_drw's knob: the report keeps the one with the better validation score
    assert imb.main(["--quick", "--epochs", "2", "--methods", "ldam_drw", "--ldam-margin", "0.3",
                     "--out", str(tmp_path)]) == 0
    assert "(of 2)" in (tmp_path / "results.md").read_text()


def test_bank_rows_draw_neighbours_from_one_shared_bank(imb, tmp_path):
    """--bank K: the augmented rows take neighbours from a bank made once under --out and reused
    by the next method (not remade), and the row records bank=K as a knob."""
    assert imb.main(["--quick", "--methods", "ros_dkgm", "--bank", "2", "--out", str(tmp_path)]) == 0
    banks = list((tmp_path / "banks").iterdir())
    assert [b.name for b in banks] == ["digits-tiny-k2"]
    made = {f.name: f.stat().st_mtime_ns for f in banks[0].iterdir()}
    assert imb.main(["--quick", "--methods", "loss_dkgm", "--bank", "2", "--out", str(tmp_path)]) == 0
    assert {f.name: f.stat().st_mtime_ns for f in banks[0].iterdir()} == made
    with open(tmp_path / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["ros_dkgm", "loss_dkgm"]
    assert all("bank=2" in r["knobs"] and int(r["n_generated"]) > 0 for r in rows)


def test_drs_is_ce_then_ros(imb, tmp_path):
    """drs, the copy control of dkgm_deferred, draws from the long-tailed set before --drw-start
    and as ros does after: at 0 it trains exactly as ros, at 1 exactly as ce (same seed)."""
    def final_loss(method, start, out):
        assert imb.main(["--quick", "--methods", method, "--drw-start", str(start), "--out", str(out)]) == 0
        with open(out / "runs.csv") as f:
            row = next(csv.DictReader(f))
        assert method != "drs" or f"drw_start={float(start)}" in row["knobs"]
        return row["final_loss"], row["class_recall"]
    assert final_loss("drs", 0, tmp_path / "a") == final_loss("ros", 0, tmp_path / "b")
    assert final_loss("drs", 1, tmp_path / "c") == final_loss("ce", 1, tmp_path / "d")
    assert final_loss("drs", 0, tmp_path / "a2") != final_loss("drs", 1, tmp_path / "c2")


def test_balanced_rows_draw_from_the_shared_bank(imb, tmp_path, monkeypatch):
    """--bank K reaches dkgm_balanced and dkgm_deferred too: their synthetic items come from the
    bank the augmented rows made (not remade), one neighbour per epoch (set_epoch before each),
    and the rows record bank=K."""
    from dkgm_aug import BalancedDKGMDataset
    assert imb.main(["--quick", "--epochs", "2", "--methods", "ros_dkgm", "--bank", "2", "--out", str(tmp_path)]) == 0
    bank = next((tmp_path / "banks").iterdir())
    made = {f.name: f.stat().st_mtime_ns for f in bank.iterdir()}
    epochs = []
    set_epoch = BalancedDKGMDataset.set_epoch
    monkeypatch.setattr(BalancedDKGMDataset, "set_epoch", lambda self, e: (epochs.append(e), set_epoch(self, e)))
    assert imb.main(["--quick", "--epochs", "2", "--methods", "dkgm_balanced", "dkgm_deferred", "--bank", "2",
                     "--out", str(tmp_path)]) == 0
    assert {f.name: f.stat().st_mtime_ns for f in bank.iterdir()} == made
    assert epochs == [1, 2, 1, 2]
    with open(tmp_path / "runs.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] != "ros_dkgm"]
    assert [r["method"] for r in rows] == ["dkgm_balanced", "dkgm_deferred"]
    assert all("bank=2" in r["knobs"] for r in rows)


def test_filtered_bank_rows_record_the_banks_rejection_share(imb, tmp_path):
    """Rows drawing from a filtered bank record the share its filter rejected while making it, the
    same for the row that built the bank and the row that reopened it (they used to record nothing)."""
    assert imb.main(["--quick", "--epochs", "1", "--methods", "ros_dkgm", "dkgm_balanced", "--bank", "2",
                     "--label-filter", "digits-evaluator", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "runs.csv") as f:
        shares = [r["rejected"] for r in csv.DictReader(f)]
    assert len(shares) == 2 and shares[0] == shares[1] and 0 <= float(shares[0]) <= 1


def test_gpu_session_stops_at_once_when_nothing_can_run(tmp_path):
    """A device machine where the rows cannot import dkgm_aug (or the split cannot be written) must
    give its minutes back in seconds with a log that says why, not fail every row and then wait for
    the deadline (a lent GPU spent 526 s that way)."""
    import os
    import subprocess
    import time
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named dkgm_aug' >&2\nexit 1\n")
    broken.chmod(0o755)
    env = dict(os.environ, QUICK="1", DEVICE="cpu", MINUTES="5", PY=str(broken), OUT=str(tmp_path / "out"),
               WORK=str(tmp_path / "work"))
    start = time.monotonic()
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh"], env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert done.returncode != 0
    log = (tmp_path / "out" / "session.log").read_text()
    assert "cannot import dkgm_aug" in log and "No module named dkgm_aug" in log


def test_gpu_session_dry_run_on_cpu(tmp_path):
    """The device script end to end on CPU: the long-tailed split, a generator trained on it,
    a plain row, then its DKGM rows without and with the label filter, all in the report; the
    generator class-conditional (CONDITIONAL=1) and alpha a knob of the rows (DKGM_ALPHA)."""
    import os
    import subprocess
    # an nvidia-smi that logs until it is stopped, as the real one does beside the rows
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\nexec sleep 900\n")
    (tmp_path / "bin" / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, QUICK="1", DEVICE="cpu", SEEDS="0", PARALLEL="2", MINUTES="8", LAUNCH_MINUTES="7",
               GENERATORS="lt", PLAIN_METHODS="ce", DKGM_METHODS="dkgm_balanced", OUT=str(tmp_path / "out"),
               WORK=str(tmp_path / "work"), CONDITIONAL="1", DKGM_ALPHA="0.5",
               PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    subprocess.run(["bash", "benchmarks/gpu_session.sh"], check=True, env=env, capture_output=True, timeout=600)
    # every row finished before the deadline: the session ends then, not when nvidia-smi would
    assert "stopping what is left: 0 job(s)" in (tmp_path / "out" / "session.log").read_text()
    report = (tmp_path / "work" / "lt" / "results.md").read_text()
    assert "| ce |" in report and "| dkgm_balanced |" in report
    assert "label_filter=digits-evaluator" in report                 # both variants ran: the variants table
    assert "dkgm_alpha=0.5" in report
    import dkgm_aug
    [gen] = (tmp_path / "work" / "lt_gen").glob("*.safetensors")
    assert dkgm_aug.load(gen).conditional
    assert (tmp_path / "out" / "session.tar.gz").stat().st_size > 0
    # the device tool brings back files of at most 16 MiB: the generator comes back beside the
    # tarball, and neither a generator nor a neighbour bank is packed into it
    assert (tmp_path / "out" / gen.name).read_bytes() == gen.read_bytes()
    import tarfile
    with tarfile.open(tmp_path / "out" / "session.tar.gz") as tar:
        assert not [n for n in tar.getnames() if n.endswith(".safetensors") or "/banks" in n]


def test_results_plot_without_per_class_recall_or_a_plain_method(tmp_path):
    """results.png is drawn from hand-made rows: one seed, a method without per-class recall,
    no non-generative method (no dashed line), or no per-class recall at all."""
    lt_report = load_benchmark("lt_report")
    args = argparse.Namespace(data="digits", rho=10.0, model="resnet10t", epochs=2, steps=None)
    row = lambda m, acc, recall: {"method": m, "seed": 0, "accuracy": acc, "class_recall": recall}
    rows = [row("ce", 0.8, "0.9;0.7;0.5"), row("dkgm_balanced", 0.82, ""), row("ros_dkgm", 0.81, "0.8;0.8;0.6")]
    for keep, best in ((rows, ("ce", "ros_dkgm")), (rows[1:], (None, "ros_dkgm")), (rows[1:2], (None, None))):
        s = {r["method"]: {"accuracy": (r["accuracy"], 0.0), "seeds": [0]} for r in keep}
        lt_report.plot_results(keep, s, [50, 20, 5], best, args, tmp_path)
        assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_report_spread_is_the_sample_std_over_seeds():
    """Seeds are a sample: the table's ± and the paired difference's std divide by n - 1 (with 2
    seeds 0.80 and 0.84 that is 0.0283, where the population std would say 0.02); one seed: 0."""
    lt_report = load_benchmark("lt_report")
    row = lambda m, s, acc: {"method": m, "seed": s, "accuracy": acc, "tail_recall": acc, "macro_f1": acc,
                             "train_s": 1.0, "generate_s": 0.0, "setup_s": 0.0, "n_generated": 0}
    rows = [row("ros", 0, 0.80), row("ros", 1, 0.84), row("ce", 0, 0.80), row("ce", 1, 0.80), row("ce", 2, 0.7)]
    s = lt_report.summarise([r for r in rows if r["method"] == "ros" or r["seed"] < 2])
    assert s["ros"]["accuracy"] == pytest.approx((0.82, 0.02 * 2 ** 0.5))
    assert s["ce"]["accuracy"] == pytest.approx((0.80, 0.0))
    assert lt_report.paired_difference(rows, "ros", "ce") == pytest.approx((0.02, 0.02 * 2 ** 0.5, 2))
    assert lt_report.summarise(rows[:1])["ros"]["accuracy"] == pytest.approx((0.80, 0.0))


def test_report_names_what_the_rows_used_and_refuses_to_choose_without_validation(lt_records, tmp_path):
    """The report's generator line comes from the rows shown (not from the last command's
    --generator); the curves are those of each method's chosen knob variant, the latest run of a
    seed; and knob variants run without a validation split are refused, not chosen by name."""
    lt_report = load_benchmark("lt_report")
    row = lambda m, knobs, val, seed=0: {"method": m, "knobs": knobs, "val_bacc": val, "seed": seed}
    rows = [row("ce", "", 0.8), row("dkgm_deferred", "generator=gens/a b.safetensors drw_start=0.8 bank=4", 0.9),
            row("kss_balanced", "kss=h=1.0, steps=10", 0.7)]
    lines = "\n".join(lt_report.generator_lines(rows))
    assert "`gens/a b.safetensors`" in lines and "`fashion-mnist-tiny`" not in lines and "h=1.0, steps=10" in lines
    assert "none (no DKGM row shown)" in "\n".join(lt_report.generator_lines(rows[:1]))

    cfg = {"data": "digits", "epochs": 2}
    path = tmp_path / "curves.csv"
    history = lambda m, seed, loss: [dict(method=m, seed=seed, epoch=e, train_loss=loss, val_bacc=0.5) for e in (1, 2)]
    lt_records.append_curves(path, history("drw", 0, 9.0), cfg, "drw_start=0.5")
    lt_records.append_curves(path, history("drw", 0, 1.0), cfg, "drw_start=0.8")
    lt_records.append_curves(path, history("drw", 0, 2.0), cfg, "drw_start=0.8")     # a rerun of seed 0
    lt_records.append_curves(path, history("drw", 1, 3.0), cfg, "drw_start=0.8")
    lt_records.append_curves(path, history("drw", 1, 7.0), {"data": "digits", "epochs": 3}, "drw_start=0.8")
    got = lt_report.curve_rows(path, cfg, {"drw": "drw_start=0.8"})
    assert sorted((r["seed"], r["epoch"], r["train_loss"]) for r in got) == [
        ("0", "1", "2.0"), ("0", "2", "2.0"), ("1", "1", "3.0"), ("1", "2", "3.0")]

    keep, chosen = lt_report.select_knobs([row("drw", "drw_start=0.5", 0.7), row("drw", "drw_start=0.8", 0.8)])
    assert chosen["drw"][0] == "drw_start=0.8"
    with pytest.raises(SystemExit, match="no validation|not all of them with a validation"):
        lt_report.select_knobs([row("la", "la_tau=5", None), row("la", "la_tau=1", None)])
    assert lt_report.select_knobs([row("la", "la_tau=5", None)])[1]["la"][0] == "la_tau=5"


def test_knob_variants_are_compared_on_the_seeds_they_share():
    """A variant with an extra, lucky seed does not win on it: variants are compared over the seeds
    all of them ran (the table still shows the chosen one's mean over its own seeds)."""
    lt_report = load_benchmark("lt_report")
    row = lambda knobs, seed, val: {"method": "drw", "knobs": knobs, "seed": seed, "val_bacc": val}
    rows = [row("a", 0, 0.80), row("a", 1, 0.80), row("b", 0, 0.79), row("b", 1, 0.79), row("b", 2, 0.95)]
    _, chosen = lt_report.select_knobs(rows)
    assert chosen["drw"][0] == "a" and chosen["drw"][1] == pytest.approx(0.80)
    _, chosen = lt_report.select_knobs(rows + [row("a", 2, 0.70)])         # now they share seeds 0-2
    assert chosen["drw"][0] == "b" and chosen["drw"][1] == pytest.approx((0.79 + 0.79 + 0.95) / 3)


def test_resume_refuses_dkgm_rows_whose_generator_file_changed_in_place(imb, tmp_path):
    """A DKGM row records its checkpoint's sha256; --resume with a file retrained at the same path
    stops with an error (it skipped the rows as done, and the report pooled the two generators)."""
    import shutil
    import dkgm_aug
    gen = tmp_path / "gen.safetensors"
    shutil.copy(dkgm_aug.checkpoint.PRETRAINED_DIR / "digits-tiny.safetensors", gen)
    args = ["--quick", "--epochs", "1", "--methods", "dkgm_deferred", "--generator", str(gen), "--out", str(tmp_path)]
    assert imb.main(args) == 0
    with open(tmp_path / "runs.csv") as f:
        assert len(next(csv.DictReader(f))["generator_sha256"]) == 16
    model = dkgm_aug.load(gen)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save(gen)
    with pytest.raises(SystemExit, match="changed in place"):
        imb.main(args + ["--resume"])


def test_fixed_steps_knob_variants_are_refused_before_running(imb, tmp_path):
    """Without a validation split the report cannot choose between knob variants: a run that would
    add a second variant to an --out stops before training, not after."""
    assert imb.main(["--quick", "--methods", "drw", "--out", str(tmp_path)]) == 0
    with pytest.raises(SystemExit, match="other knobs"):
        imb.main(["--quick", "--methods", "drw", "--drw-start", "0.5", "--out", str(tmp_path)])


def test_a_row_gives_the_same_result_whether_its_bank_was_built_or_on_disk(imb, tmp_path):
    """A row that built its bank in-process loaded the generator, which drew from torch's global RNG
    before the classifier was made: the same command gave another result once the bank was on disk,
    and the row was no longer paired with its copy control over seeds."""
    def row(out):
        assert imb.main(["--quick", "--methods", "dkgm_deferred", "--bank", "2", "--out", str(out)]) == 0
        with open(out / "runs.csv") as f:
            return [(r["final_loss"], r["class_recall"]) for r in csv.DictReader(f)][-1]
    built = row(tmp_path)
    (tmp_path / "runs.csv").unlink()
    assert row(tmp_path) == built            # the bank is on disk now


def test_rows_record_their_code_and_the_report_names_methods_mixing_code(lt_records, tmp_path):
    """--resume pools rows across code changes: each row records a hash of the sources that made it,
    and the report says which methods' rows ran on more than one (rows from before: 'not recorded')."""
    import lt_report
    v = lt_records.code_version()
    assert len(v) == 12 and int(v, 16) >= 0 and v == lt_records.code_version()
    assert "code" in lt_records.FIELDS
    rows = [dict(method="ce", code=v), dict(method="ce", code=v), dict(method="ros", code=v), dict(method="ros")]
    (line,) = lt_report.code_lines(rows)
    assert v in line and "not recorded" in line and line.endswith("more than one: ros")
    (line,) = lt_report.code_lines(rows[:3])
    assert "more than one" not in line
    assert lt_report.code_lines([]) == []
