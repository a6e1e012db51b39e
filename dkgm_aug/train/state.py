"""The trainer's resumable state: one safetensors file per stage, written atomically, with the
stage network's weights, EMA, optimizer, step, every rank's RNG states and the settings a resume
must share; and the CSV log that a resume trims to the saved step.

Tensor names: ``model.<the network's place in the model>.*`` (``model.stage1.*`` for DKGM's
stage 1, ``model.*`` when a stage trains the whole model), ``ema.*``, ``opt.<param>.<key>``,
``rng.noise.<rank>``, ``rng.torch.<rank>`` and (on CUDA) ``rng.cuda.<rank>``; the metadata
``state`` is JSON (the format ``trainer-state`` of :data:`dkgm_aug.checkpoint.FORMATS`). Files
from older versions, which hold
both DKGM stages and single-process RNG states (``rng.noise``, ``rng.torch``) and record no
settings, still resume.
"""
import csv
import json
import warnings
from pathlib import Path

import torch

from ..checkpoint import FORMATS, FormatError, read_tensors, write_tensors
from ..errors import CheckpointError, DKGMError
from ..files import atomic_write

LOG_HEADER = ["step", "loss", "images_per_s", "elapsed_s"]
START_OVER = "start over with --no-resume (Python: resume=False) or another --work-dir (Python: out_dir=)"
KEY = FORMATS["trainer-state"].key


def arch(config: dict) -> dict:
    """The part of a model config that must match to resume (JSON-normalised, without ``info``)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k != "info"}))


def weights_prefix(model: torch.nn.Module, net: torch.nn.Module) -> str:
    """The state-file prefix of a stage network's weights: its name in ``model.state_dict()``."""
    path = next(name for name, child in model.named_modules() if child is net)
    return f"model.{path}." if path else "model."


def weights_digest(tensors) -> str:
    """A sha256 (first 16 hex digits) of a network's weights: ``{name: tensor}``, names sorted."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(tensors):
        v = tensors[name].detach().cpu().contiguous()
        h.update(f"{name} {tuple(v.shape)} {v.dtype}".encode())
        h.update(v.flatten().view(torch.uint8).numpy() if v.numel() else b"")
    return h.hexdigest()[:16]


def check_start_weights(path: Path, meta: dict, tensors: dict, prefix: str, given: str, loaded: bool,
                        max_steps: int, tag: str | None = None) -> None:
    """Warn when resuming would discard weights the user meant to train: the network passed in (its
    weights' digest ``given``) is neither the one the saved run started from nor one it saved (its
    weights or their EMA, which ``fit`` leaves in the model), and either the saved run is already at
    ``max_steps`` (two replicates seeded apart sharing ``out_dir``: the second trained nothing and came
    back as the first) or the model is a loaded or trained checkpoint (``loaded``: one meant to be
    fine-tuned). A fresh, unseeded init resuming a run with steps left is the usual restart after a
    crash, or more steps for a finished run: no warning. ``tag``: the start digest of the run this very
    model object was last trained in (an interrupted ``fit`` run again)."""
    started = meta.get("start_weights")
    if not started or given == started or tag == started:   # states from before the start was recorded: no check
        return
    done = int(meta["step"]) >= max_steps
    if not (done or loaded):
        return
    saved = {weights_digest({k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}) for p in (prefix, "ema.")}
    if given not in saved:     # the run's own weights, or their average (what fit() returns), continue it
        what = (f"is at step {meta['step']} of {max_steps} already: resuming trains nothing and returns that run's "
                "weights" if done else f"is at step {meta['step']}: resuming continues that run")
        warnings.warn(f"{path} holds a run that started from other weights than the model passed in, and {what}, "
                      "discarding this model's weights (a replicate with another "
                      "seed, or a checkpoint meant to be fine-tuned?). To train these weights, pass resume=False "
                      "(CLI: --no-resume) or another out_dir (--work-dir)", stacklevel=6)


def write_state(path: Path, prefix: str, net, ema, opt, rngs: list, meta: dict) -> None:
    """Write the state atomically; ``rngs`` holds each rank's ``(noise, torch, cuda)`` RNG states
    (``cuda`` None off CUDA: dropout on a GPU draws from the device's generator)."""
    tensors = {f"{prefix}{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for key, val in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(val)
    for r, (noise_state, torch_state, *cuda_state) in enumerate(rngs):
        tensors[f"rng.noise.{r}"], tensors[f"rng.torch.{r}"] = noise_state, torch_state
        if cuda_state and cuda_state[0] is not None:
            tensors[f"rng.cuda.{r}"] = cuda_state[0]
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = dict(meta, param_groups=opt_state["param_groups"])
    write_tensors(path, tensors, {KEY: json.dumps(meta)}, "trainer-state")


def read_state(path: Path) -> tuple[dict, dict]:
    """The metadata and tensors of a state file, refused when it is unreadable, of another format
    (a FormatError naming both) or not finite."""
    try:
        raw, tensors = read_tensors(path, "trainer-state")
        meta = json.loads(raw[KEY])
        if not {"step", "model_config", "param_groups"} <= set(meta):
            raise KeyError("step, model_config or param_groups")
    except FormatError as exc:
        raise FormatError(f"{exc}; delete it, or {START_OVER}") from None
    except Exception as exc:   # a cut-off file, or metadata that is not what write_state writes
        raise CheckpointError(f"cannot read the training state {path} ({type(exc).__name__}: {exc}): it is "
                              f"truncated or corrupt; delete it, or {START_OVER}") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"the training state {path} holds NaN or inf values ({', '.join(bad[:3])}), "
                              f"so training cannot go on from it; delete it, or {START_OVER}")
    return meta, tensors


def check_resume(path: Path, meta: dict, config: dict, settings: dict, max_steps: int, stage: int,
                 warn: bool = True) -> int:
    """The saved step, once the state is known to come from this same run: the same model
    ``config``, the same ``settings`` (``{name: (value, where it is set)}``, or ``(value, where,
    legacy)``: ``legacy`` (or a function giving it) is the value older dkgm_aug recorded for this run,
    accepted with a warning)
    and at most ``max_steps`` steps done. ``warn``: say so when the file predates the settings' record."""
    if arch(meta["model_config"]) != arch(config):
        raise DKGMError(f"{path} was saved for another model (--preset and the model flags / the model's "
                        f"config); use the same model to resume, or {START_OVER}")
    missing = [k for k in settings if k not in meta]
    if missing and warn:
        warnings.warn(f"{path} was written by an older dkgm_aug that did not record {', '.join(missing)}: "
                      f"resuming, but the settings could not be checked against this run's")
    for key, (value, where, *legacy) in settings.items():
        if key in meta and meta[key] != value and legacy and meta[key] == (legacy[0]() if callable(legacy[0])
                                                                             else legacy[0]):
            if warn:
                warnings.warn(f"{path} recorded {key} as an older dkgm_aug computed it ({meta[key]!r}); it matches "
                              "this run's by that rule, so resuming (the new one also covers transforms and samplers)")
            continue
        if key in meta and meta[key] != value:
            raise DKGMError(f"{path} was saved by a run with {key}={meta[key]!r}, this run has {key}={value!r} "
                            f"({where}): resuming would mix the two runs. Use the saved setting to resume, "
                            f"or {START_OVER}")
    step = int(meta["step"])
    if step > max_steps:
        raise DKGMError(f"{path} is at step {step}, more than max_steps={max_steps} (--stage{stage}-steps / "
                        f"max_steps=): give at least {step} steps to resume, or {START_OVER}")
    return step


def restore(tensors: dict, meta: dict, prefix: str, net, ema, opt, gen, rank: int, device) -> None:
    """Load the stage network, EMA, optimizer and this rank's RNG states from a read state. Only
    the trained network's weights are restored: the other DKGM stage, which older files also hold,
    is left alone (stage 2 learns from blurred real images, independently of stage 1)."""
    net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v.to(device) if key != "step" else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    setters = [("noise", gen.set_state), ("torch", torch.set_rng_state)]
    if torch.device(device).type == "cuda":
        setters.append(("cuda", lambda state: torch.cuda.set_rng_state(state, device)))
    for name, set_state in setters:
        # "rng.noise"/"rng.torch": single-process files from before; a rank the file lacks
        # (more processes than the run that wrote it) keeps its fresh seed
        saved = tensors.get(f"rng.{name}.{rank}", tensors.get(f"rng.{name}") if rank == 0 else None)
        if saved is not None:
            set_state(saved)


def open_log(path: Path, step: int):
    """The CSV log, open for appending, holding only the rows up to ``step``: a run killed after
    logging a step but before saving it logs that step again when resumed."""
    rows = []
    if step and path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and r[0].isdigit() and int(r[0]) <= step]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([LOG_HEADER, *rows])
    atomic_write(path, write)
    return open(path, "a", newline="")
