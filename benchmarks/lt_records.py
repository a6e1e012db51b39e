"""The rows of the long-tailed benchmark: each method's knobs and the settings a row depends
on (``config_of``), the columns of ``runs.csv`` and ``curves.csv``, and reading and appending
them under a lock, so parallel runs can share one file."""
import contextlib
import csv
import functools
import io
import os
import re
from pathlib import Path

import numpy as np
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
for _m in ("dkgm_balanced", "dkgm_deferred") + AUGMENTED:   # so are a neighbour bank, DKGM's alpha and steps (when set)
    KNOBS[_m] += ("bank", "dkgm_alpha", "dkgm_steps")


def knob_value(name: str, args):
    """A knob as the report shows it: the generators resolved to what the run used."""
    if name == "generator":
        return args.generator or SHIPPED[args.data]
    if name == "evae":   # d_z named only off its default, so rows from before it was recorded keep their knobs
        dz = "" if args.evae_dz == 32 else f", d_z {args.evae_dz}"
        return args.evae or f"fitted here ({args.evae_epochs} epochs{dz})"
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
                    and (n not in ("dkgm_alpha", "dkgm_steps") or getattr(args, n) is not None))


def parse_knobs(knobs: str) -> dict:
    """``knobs_of``'s string back into ``{name: value}`` (values may hold spaces)."""
    names = sorted({n for ns in KNOBS.values() for n in ns} | {"combine_loss"}, key=len, reverse=True)
    parts = re.split(r" (?=(?:%s)=)" % "|".join(map(re.escape, names)), knobs) if knobs else []
    return dict(p.split("=", 1) for p in parts)


def generator_sha(method: str, args) -> str:
    """The first 16 hex digits of the sha256 of the DKGM checkpoint file a DKGM row uses ('' for
    other rows): the knob names a path, and a file retrained in place must not pass for the old one."""
    if "generator" not in KNOBS.get(method, ()):
        return ""
    from dkgm_aug.checkpoint import resolve
    spec = str(knob_value("generator", args))
    stat = resolve(spec).stat()
    return _file_sha16(spec, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _file_sha16(spec: str, mtime_ns: int, size: int) -> str:
    """One read of a checkpoint file per process and version of it, however many methods and rows use it."""
    from dkgm_aug.cache import generator_digest
    return generator_digest(spec)[1][:16]


def check_generators(done: list, args, methods) -> None:
    """Refuse to resume (or report) DKGM rows whose checkpoint file has changed since they ran."""
    now = {m: generator_sha(m, args) for m in methods}
    stale = [r for r in done if now.get(r["method"]) and r.get("generator_sha256")
             and r["knobs"] == knobs_of(r["method"], args) and r["generator_sha256"] != now[r["method"]]]
    if stale:
        gen = knob_value("generator", args)
        raise SystemExit(f"{gen} is not the file the {len(stale)} {stale[0]['method']} "
                         f"row(s) in runs.csv were made with (sha256 {stale[0]['generator_sha256']}..., now "
                         f"{now[stale[0]['method']]}...): it changed in place; put the new one at another path "
                         "(it is another knob) or use another --out")


def config_of(args) -> dict:
    """Every setting a row depends on, but for its method's knobs; the report only pools rows
    whose settings match, and ``--resume`` only skips those. The converged protocol (``--epochs``)
    adds its own, and makes the generators and dkgm_p knobs of their methods."""
    cfg = dict(data=args.data, rho=args.rho, split_seed=args.split_seed, model=args.model, steps=args.steps,
               batch=args.batch, generator=knob_value("generator", args), evae=knob_value("evae", args),
               kss=knob_value("kss", args), dkgm_p=args.dkgm_p, class_order=args.class_order, profile=args.profile,
               channels=" ".join(map(str, args.channels or ())), lr=args.lr, weight_decay=args.weight_decay,
               shift=args.shift, size=args.size if args.data == "digits" else "")
    if getattr(args, "epochs", None):
        for key in ("dkgm_p", "generator", "evae", "kss"):
            del cfg[key]
        cfg.update(steps="", epochs=args.epochs, val_fraction=args.val_fraction)
    return cfg


# Rows written before a setting was recorded ran with the value every earlier command used (the
# commands.txt files beside them name no other): they are read as having it.
RECORDED_LATER = {"class_order": "natural", "profile": "exp", "lr": "0.001", "weight_decay": "0.0001",
                  "shift": "1", "dkgm_p": "0.5"}


def with_recorded_later(saved: dict) -> dict:
    """A row's (or a curve's) settings, those recorded later filled in as above."""
    return {**saved, **{k: saved.get(k) or v for k, v in RECORDED_LATER.items()},
            "size": saved.get("size") or ("32" if saved.get("data") == "digits" else "")}


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The first 12 hex digits of a sha256 over the library's and this benchmark's source files
    (relative path and bytes, sorted): recorded in each row, so that rows made by different code,
    pooled by ``--resume`` or ``--report-only``, are told apart in the report. A hash of the files,
    not a git commit, so a snapshot copy of the tree (``git archive``) records the same value."""
    import hashlib
    here = Path(__file__).resolve().parent
    files = sorted((here.parent / "dkgm_aug").rglob("*.py")) + sorted(
        p for p in here.glob("*.py") if p.name in ("imbalanced.py", "common.py") or p.name.startswith("lt_"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(here.parent).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def hardware(device="cpu") -> str:
    where = (f"classifier on {torch.cuda.get_device_name()}" if str(device).startswith("cuda")
             and torch.cuda.is_available() else "CPU only")
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__}, {where}"


# -- runs.csv and curves.csv -----------------------------------------------------------------------
FIELDS = ["method", "seed", "data", "rho", "split_seed", "model", "steps", "batch", "generator", "evae", "kss", "dkgm_p",
          "n_train", "n_pool", "n_generated", "final_loss", "train_s", "setup_s", "generate_s", "accuracy",
          "macro_f1", "tail_recall", "class_recall", "epochs", "val_fraction", "class_order", "profile", "channels",
          "lr", "knobs", "chosen_epoch", "val_bacc", "rejected", "hardware", "weight_decay", "shift", "size",
          "generator_sha256", "code"]
NUMBERS = ("accuracy", "macro_f1", "tail_recall", "train_s", "setup_s", "generate_s", "n_generated")


@contextlib.contextmanager
def locked(path: Path):
    """Hold the exclusive lock of the CSV ``path`` (a ``.lock`` file beside it, so that a file
    replaced under the lock is still guarded by it)."""
    import fcntl
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _upgrade(path: Path, fields: list) -> None:
    """Rewrite a CSV written by an older version with the columns ``fields`` (under the lock)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        old = list(reader)
    if reader.fieldnames and reader.fieldnames != fields:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
            w.writeheader()
            w.writerows(old)
        os.replace(tmp, path)


def locked_append(path: Path, fields: list, rows: list) -> None:
    """Append ``rows`` to the CSV at ``path`` under an exclusive lock, so parallel runs sharing one
    file never write two headers or interleave; the header first when the file is empty, the file
    rewritten with the columns ``fields`` first when an older version wrote it with others."""
    line = io.StringIO()
    csv.DictWriter(line, fieldnames=fields, restval="").writerows(rows)
    with locked(path):
        if path.exists() and path.stat().st_size:
            _upgrade(path, fields)
        with open(path, "a", newline="") as f:
            if os.fstat(f.fileno()).st_size == 0:
                csv.DictWriter(f, fieldnames=fields).writeheader()
            f.write(line.getvalue())


def append_row(path: Path, row: dict) -> None:
    """One line per finished run, written in one call, so a crash loses at most the run in flight
    and two processes can share the file."""
    locked_append(path, FIELDS, [row])


def read_rows(path: Path, config: dict, tail=None) -> list:
    """The rows of ``path`` whose settings equal ``config``, numbers parsed; a rerun of a
    (method, knobs, seed) replaces the older row. ``tail`` (class indices): each row's tail recall
    recomputed from its per-class recall, so a report uses one definition of the tail for every row."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [dict(with_recorded_later(r), knobs=r.get("knobs") or "") for r in rows]
    rows = [r for r in rows if all(r.get(k, "") == str(v) for k, v in config.items())]
    for r in rows:
        r.update({k: float(r[k]) for k in NUMBERS}, seed=int(r["seed"]),
                 val_bacc=float(r["val_bacc"]) if r.get("val_bacc") else None)
        if tail is not None and r.get("class_recall"):
            recall = [float(v) for v in r["class_recall"].split(";")]
            r["tail_recall"] = float(np.nanmean([recall[c] for c in tail]))
    latest = {(r["method"], r["knobs"], r["seed"]): r for r in rows}
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(latest.values(), key=lambda r: (order.get(r["method"], len(order)), r["knobs"], r["seed"]))


CURVE_FIELDS = ["method", "seed", "epoch", "train_loss", "val_bacc", "config", "knobs"]


def append_curves(path: Path, history: list, config: dict, knobs: str) -> None:
    key = ";".join(f"{k}={v}" for k, v in config.items())
    locked_append(path, CURVE_FIELDS, [dict(h, config=key, knobs=knobs) for h in history])
