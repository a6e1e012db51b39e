"""The rows of the long-tailed benchmark: each method's knobs and the settings a row depends
on (``config_of``), the columns of ``runs.csv`` and ``curves.csv``, and reading and appending
them under a lock, so parallel runs can share one file."""
import csv
import io
import os
from pathlib import Path

import torch

from common import SHIPPED, cpu_name
from lt_losses import AUGMENTED, GENERATIVE, METHODS


# -- knobs and settings ----------------------------------------------------------------------------
# Each method's knobs: variants of one method are rows with other values; the converged report
# keeps the variant with the best validation balanced accuracy.
KNOBS = {"drw": ("drw_start",), "drs": ("drw_start",), "ldam_drw": ("drw_start", "ldam_margin", "ldam_s"), "balanced_softmax": ("la_tau",),
         "mixup": ("mixup_alpha",), "mixup_drw": ("mixup_alpha", "drw_start"), "dkgm_balanced": ("generator",),
         "dkgm_augment": ("generator", "dkgm_p"), "ros_dkgm": ("generator", "dkgm_p"),
         "loss_dkgm": ("generator", "combine_loss", "dkgm_p"), "dkgm_deferred": ("generator", "drw_start"),
         "evae_balanced": ("evae",), "kss_balanced": ("kss",)}
for _m in GENERATIVE:      # a label filter is a knob of every generative method (shown only when set)
    KNOBS[_m] += ("label_filter",)
for _m in ("dkgm_balanced", "dkgm_deferred") + AUGMENTED:   # so are a neighbour bank and DKGM's alpha (when set)
    KNOBS[_m] += ("bank", "dkgm_alpha")


def knob_value(name: str, args):
    """A knob as the report shows it: the generators resolved to what the run used."""
    if name == "generator":
        return args.generator or SHIPPED[args.data]
    if name == "evae":
        return args.evae or f"fitted here ({args.evae_epochs} epochs)"
    if name == "label_filter":
        return args.label_filter or "none"
    if name == "kss":
        return f"h={args.kss_h}, steps={args.kss_steps}"
    return getattr(args, name)


def knobs_of(method: str, args) -> str:
    names = KNOBS.get(method, ())
    if method == "loss_dkgm":
        names = names + KNOBS.get(args.combine_loss, ())
    return " ".join(f"{n}={knob_value(n, args)}" for n in dict.fromkeys(names)
                    if (n != "label_filter" or args.label_filter) and (n != "bank" or args.bank)
                    and (n != "dkgm_alpha" or args.dkgm_alpha is not None))


def config_of(args) -> dict:
    """The settings a row depends on, but for its method's knobs; the report only pools rows
    whose settings match. The converged protocol (``--epochs``) adds its own."""
    cfg = dict(data=args.data, rho=args.rho, split_seed=args.split_seed, model=args.model, steps=args.steps,
               batch=args.batch, generator=knob_value("generator", args), evae=knob_value("evae", args),
               kss=knob_value("kss", args), dkgm_p=args.dkgm_p)
    if getattr(args, "epochs", None):   # generators and dkgm_p are knobs of their methods here
        for key in ("dkgm_p", "generator", "evae", "kss"):
            del cfg[key]
        cfg.update(steps="", epochs=args.epochs, val_fraction=args.val_fraction, class_order=args.class_order,
                   profile=args.profile, channels=" ".join(map(str, args.channels or ())), lr=args.lr)
    return cfg


def hardware(device="cpu") -> str:
    where = (f"classifier on {torch.cuda.get_device_name()}" if str(device).startswith("cuda")
             and torch.cuda.is_available() else "CPU only")
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__}, {where}"


# -- runs.csv and curves.csv -----------------------------------------------------------------------
FIELDS = ["method", "seed", "data", "rho", "split_seed", "model", "steps", "batch", "generator", "evae", "kss", "dkgm_p",
          "n_train", "n_pool", "n_generated", "final_loss", "train_s", "setup_s", "generate_s", "accuracy",
          "macro_f1", "tail_recall", "class_recall", "epochs", "val_fraction", "class_order", "profile", "channels",
          "lr", "knobs", "chosen_epoch", "val_bacc", "rejected", "hardware"]
NUMBERS = ("accuracy", "macro_f1", "tail_recall", "train_s", "setup_s", "generate_s", "n_generated")


def locked_append(path: Path, fields: list, rows: list) -> None:
    """Append ``rows`` to the CSV at ``path`` (the header first when the file is empty) under an
    exclusive lock, so parallel runs sharing one file never write two headers or interleave."""
    import fcntl
    line = io.StringIO()
    w = csv.DictWriter(line, fieldnames=fields, restval="")
    w.writerows(rows)
    with open(path, "a", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if os.fstat(f.fileno()).st_size == 0:     # checked under the lock: another run may have just written
            csv.DictWriter(f, fieldnames=fields).writeheader()
        f.write(line.getvalue())


def append_row(path: Path, row: dict) -> None:
    """One line per finished run, written in one call, so a crash loses at most the run in flight
    and two processes can share the file."""
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader)
        if reader.fieldnames != FIELDS:     # written by an older version: rewrite once with the new columns
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS, restval="", extrasaction="ignore")
                w.writeheader()
                w.writerows(old)
            os.replace(tmp, path)
    locked_append(path, FIELDS, [row])


def read_rows(path: Path, config: dict) -> list:
    """The rows of ``path`` whose settings equal ``config``, numbers parsed; a rerun of a
    (method, knobs, seed) replaces the older row."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["dkgm_p"] = r.get("dkgm_p") or "0.5"      # rows from before --dkgm-p existed used 0.5
        r["knobs"] = r.get("knobs") or ""
    rows = [r for r in rows if all(r.get(k, "") == str(v) for k, v in config.items())]
    for r in rows:
        r.update({k: float(r[k]) for k in NUMBERS}, seed=int(r["seed"]),
                 val_bacc=float(r["val_bacc"]) if r.get("val_bacc") else None)
    latest = {(r["method"], r["knobs"], r["seed"]): r for r in rows}
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(latest.values(), key=lambda r: (order.get(r["method"], len(order)), r["knobs"], r["seed"]))


def append_curves(path: Path, history: list, config: dict) -> None:
    key = ";".join(f"{k}={v}" for k, v in config.items())
    locked_append(path, ["method", "seed", "epoch", "train_loss", "val_bacc", "config"],
                  [dict(h, config=key) for h in history])
