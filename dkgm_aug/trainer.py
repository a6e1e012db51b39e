"""The trainer of every dkgm_aug generator: DKGM (two stages), EVAE and VAE (one stage each),
with EMA, gradient clipping, AMP on CUDA, a CSV log, sample grids and resumable training state.

Example::

    model = DKGM.from_preset("tiny", image_size=28, channels=1)
    trainer = Trainer(model, dataset, out_dir="runs/fmnist", batch_size=64, max_steps=2000)
    for stage in model.stages:
        trainer.fit(stage)
    model.save("gen.safetensors")

What the trainer asks of a model: ``stages``, the stages in training order (DKGM ``(1, 2)``,
EVAE and VAE ``(1,)``); ``stage_module(stage)``, the network whose parameters the stage trains
(a part of the model or the model itself: the optimizer, the EMA, DDP and the state file cover
it alone); calling ``model(x, stage=stage, generator=g)``, the scalar loss of a batch ``x`` in
[-1, 1] with its noise drawn from ``g`` (an EVAE converts to its [0, 1] BCE targets itself);
``preview(x, stage, generator=g)``, rows of images in [-1, 1] for the sample grid; and
``channels``, ``config()`` and ``save(path)``. A model whose ``conditional`` attribute is true
(a class-conditional DKGM) is also given each image's class index: ``model(x, stage=stage,
generator=g, labels=y)`` and ``preview(x, stage, generator=g, labels=y)``, ``y`` a LongTensor.

``data``: a tensor ``[N, C, H, W]`` (uint8, or float in [0, 1]), a map-style Dataset of images
or ``(image, label)`` pairs, or a DataLoader (see :mod:`dkgm_aug.train.data`); a class-conditional
model needs the labels: ``(image, label)`` pairs, e.g. ``TensorDataset(images, labels)``.

Files in ``out_dir`` (none when ``out_dir=None``): ``state_stage{s}.safetensors`` (the stage
network's weights, EMA, optimizer, step, RNG and the run's settings: written atomically every
``save_every`` steps and at the end), ``model.safetensors`` (the model with EMA weights),
``log_stage{s}.csv`` and ``samples_stage{s}_step{N}.png``.

``fit`` resumes from the stage's state file when there is one (``resume=False`` starts over
and deletes it). A resume never mixes two runs: it is refused when the state was saved with
another model config, ``lr``, ``batch_size``, ``seed`` or data (a hash of the images), or at a
later step than ``max_steps``; it restores only the trained stage's network (DKGM's stage 2
learns from blurred real images, independently of stage 1), and drops the log rows past the
resumed step.

Under ``torchrun`` (or an initialised ``torch.distributed``) the trained network runs in
DistributedDataParallel, ``batch_size`` is the global batch split over the ranks, and only
rank 0 writes files: see docs/distributed.md.
"""
import csv
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ._validate import check_device, check_float, check_int, check_seed
from .dkgm import DKGM
from .errors import DataError, DKGMError
from .images import check_not_binary, from_model
from .nn import evaluating
from .sampling import _names
from .train.data import Feed, data_fingerprint, held_images
from .train.distributed import gather, in_place, init_distributed, mean_over_ranks
from .train.ema import EMA
from .train.state import (check_resume, check_start_weights, open_log, read_state, restore, weights_digest,
                          weights_prefix, write_state)

__all__ = ["Trainer", "init_distributed", "data_fingerprint"]


@dataclass
class _Run:
    """One ``fit`` call: the trained network (and its DDP wrapper), its EMA and optimizer, the
    noise generator, the step, and the counters of the throughput log."""
    stage: int
    net: torch.nn.Module
    wrapped: torch.nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    gen: torch.Generator
    prefix: str
    start_weights: str | None = None   # the digest of the weights the run started from (kept through resumes)
    step: int = 0
    seen: int = 0
    t0: float = 0.0
    start: float = 0.0
    log: object = None         # the open CSV log file (rank 0, with an out_dir)


class Trainer:
    """Trains ``model``'s stages on ``data`` (see the module docstring); ``fit(stage)`` runs one."""

    def __init__(self, model, data, out_dir="runs/dkgm", batch_size: int = 64, max_steps: int | None = None,
                 epochs: float | None = None, lr: float = 3e-4, ema_decay: float = 0.999, grad_clip: float = 1.0,
                 amp: bool | None = None, save_every: int = 500, log_every: int = 10, seed: int = 0,
                 device=None, num_workers: int = 0, progress: bool = True, resume: bool = True):
        if (max_steps is None) == (epochs is None):
            raise DKGMError("give exactly one of max_steps or epochs")
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.lr, self.ema_decay = check_float("lr", lr), check_float("ema_decay", ema_decay)
        if self.lr <= 0:
            raise DKGMError(f"lr must be > 0, got {lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise DKGMError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        if epochs is not None and check_float("epochs", epochs) <= 0:
            raise DKGMError(f"epochs must be > 0, got {epochs!r}")
        max_steps = None if max_steps is None else check_int("max_steps", max_steps, 1)
        self.grad_clip = check_float("grad_clip", grad_clip, 0)
        self.save_every, self.log_every = check_int("save_every", save_every, 1), check_int("log_every", log_every, 1)
        num_workers, self.seed = check_int("num_workers", num_workers, 0), check_seed(seed)
        self.rank, self.world_size, self.device = self._join(check_device(device))
        self.distributed = self.world_size > 1
        self.model = model.to(self.device)
        self.conditional = bool(getattr(model, "conditional", False))   # batches are (x, labels)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.writes = self.rank == 0 and self.out_dir is not None   # only rank 0 writes files
        self.amp = (self.device.type == "cuda") if amp is None else bool(amp)
        self.progress, self.resume, self.data = progress, resume, data
        self._feed(num_workers)
        self.max_steps = max_steps if max_steps is not None else math.ceil(epochs * self.steps_per_epoch)
        if self.max_steps < 1:
            raise DKGMError(f"training needs at least one step, got max_steps={self.max_steps}")
        self._preview = None
        self.elapsed = {}        # training seconds per stage, summed over resumed runs
        self.losses = []         # the last fit's loss at each step (mean over the ranks)

    def _join(self, device) -> tuple:
        """``(rank, world_size, device)``, joining torchrun's process group: one GPU per process."""
        rank, world_size = init_distributed(device)
        if self.batch_size < world_size:
            raise DKGMError(f"batch_size is the global batch, split over {world_size} processes: "
                            f"it must be >= {world_size}, got {self.batch_size}")
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if world_size > 1 and device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
            torch.cuda.set_device(device)
        return rank, world_size, device

    def _feed(self, num_workers: int) -> None:
        self.feed = Feed(self.data, self.device, self.batch_size, self.seed, self.rank, self.world_size, num_workers,
                         labels=self.conditional)
        first, _ = self._split(self.feed.first(1))
        if first.shape[1] != self.model.channels:
            raise DataError(f"the data has {first.shape[1]} channels but the model takes {self.model.channels}; "
                            "build the model with channels= matching the data, or convert the images")
        self._check_size(tuple(first.shape[-2:]))
        held = held_images(self.data)
        if held is not None:   # all the images at once: not at the step whose batch holds one
            check_not_binary(held, "training images")
        self.n_items, self.local_batch = self.feed.n_items, self.feed.local_batch
        self.steps_per_epoch = self.feed.steps_per_epoch
        self.data_id = self._data_id(sampler=self.world_size == 1)   # ranks may hold their own samplers

    def _data_id(self, legacy: bool = False, **kw) -> str:
        """The data's record in the training state, naming its rule (``fingerprint 2``: transforms and
        samplers count); ``legacy=True``: as dkgm_aug wrote it before they did, without a rule (asked
        for only when a saved state's record differs, so only an older state can match it)."""
        fp = data_fingerprint(self.data, labels=self.conditional, legacy=legacy, **kw)
        return f"{self.n_items} items, sha256 {fp}" + ("" if legacy else "; fingerprint 2")

    def _check_size(self, size: tuple) -> None:
        """The data's image size against the one the model records (``image_size=``, saved in its
        checkpoint): an EVAE or VAE decodes at that size only, so other data is refused; a DKGM (fully
        convolutional) trains on it, with a warning, since its checkpoint would name another size."""
        recorded = tuple(getattr(self.model, "image_size", size))
        if size == recorded:
            return
        what = (f"the data's images are {size[0]}x{size[1]} but the model was built with image_size="
                f"{recorded[0]}x{recorded[1]}")
        if not isinstance(self.model, DKGM):
            raise DataError(f"{what}, the only size its decoder makes: build it with image_size={size}")
        warnings.warn(f"{what}: it trains, but its checkpoint will say {recorded[0]}x{recorded[1]}; build it "
                      f"with image_size={size}", stacklevel=4)

    def _split(self, batch) -> tuple:
        """A batch as ``(x, keywords of the model's call)``: ``labels=y`` for a class-conditional model."""
        return (batch[0], dict(labels=batch[1])) if self.conditional else (batch, {})

    def _batches(self, start_step: int, stage: int = 1):
        """Yield this rank's model-range batches of ``stage`` from ``start_step`` on, forever."""
        return self.feed.batches(start_step, stream=stage)

    # -- state ------------------------------------------------------------------------------------
    def _state_path(self, stage: int) -> Path:
        return self.out_dir / f"state_stage{stage}.safetensors"

    def _settings(self, stage: int) -> dict:
        """What a resumed run must share with the run that saved the state: ``{name: (value, where it is set)}``."""
        batch_flag = "--batch-size" if stage == 1 else "--stage2-batch-size or --batch-size"
        loader = self.data if isinstance(self.data, torch.utils.data.DataLoader) else None
        return {"lr": (self.lr, "--lr / lr="),
                "batch_size": ((self.batch_size, f"{batch_flag} / batch_size=") if loader is None
                               else (loader.batch_size, "the DataLoader's batch_size")),
                "seed": (self.seed, "--seed / seed="),
                "data": (self.data_id, "--data, --split, --limit, --size, --channels / data=",
                         lambda: self._data_id(legacy=True)),
                "ema_decay": (self.ema_decay, "ema_decay="),
                "grad_clip": (self.grad_clip, "grad_clip="),
                "amp": (self.amp and self.device.type == "cuda", "amp= (on CUDA)")}

    def _save_state(self, run: _Run) -> None:
        """Collective: gathers every rank's RNG states (each draws its own noise); rank 0 writes the file."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None   # GPU dropout
        rngs = gather((run.gen.get_state(), torch.get_rng_state(), cuda), self.world_size)
        if not self.writes:
            return
        meta = dict(stage=run.stage, step=run.step, max_steps=self.max_steps, world_size=self.world_size,
                    start_weights=run.start_weights,
                    elapsed_s=self.elapsed.get(run.stage, 0.0), model_config=self.model.config(),
                    **{k: v[0] for k, v in self._settings(run.stage).items()})
        write_state(self._state_path(run.stage), run.prefix, run.net, run.ema, run.opt, rngs, meta)

    def _load_state(self, run: _Run) -> int:
        """Restore the trained network, EMA, optimizer and RNG; returns the saved step."""
        path = self._state_path(run.stage)
        meta, tensors = read_state(path)
        step = check_resume(path, meta, self.model.config(), self._settings(run.stage), self.max_steps,
                            run.stage, warn=self.rank == 0)
        if self.rank == 0:
            info = getattr(self.model, "info", None) or {}
            loaded = any(k in info for k in ("training", "warm_start", "init"))
            # a later stage's state beside it: a multi-stage script restarted, this stage done before the crash
            restarting = any(self._state_path(s).exists() for s in self.model.stages if s > run.stage)
            check_start_weights(path, meta, tensors, run.prefix, run.start_weights, loaded,
                                float("inf") if restarting else self.max_steps, getattr(run.net, "_dkgm_run_start", None))
        run.start_weights = meta.get("start_weights") or None   # unknown for a state from before it was recorded
        restore(tensors, meta, run.prefix, run.net, run.ema, run.opt, run.gen, self.rank, self.device)
        self.elapsed[run.stage] = float(meta.get("elapsed_s", 0.0))
        return step

    def _resumable(self, stage: int) -> bool:
        if self.out_dir is None:
            return False
        found = self.resume and self._state_path(stage).exists()
        seen = gather(found, self.world_size)
        if len(set(seen)) > 1:   # every rank raises, so none is left waiting in a collective
            ranks = [r for r, f in enumerate(seen) if f]
            raise DKGMError(f"{self._state_path(stage)} exists for ranks {ranks} only: "
                            "out_dir must be on a filesystem that all nodes share")
        return found

    # -- outputs ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _write_samples(self, stage: int, step: int) -> Path:
        from torchvision.utils import save_image
        if self._preview is None:   # read outside torch's RNG stream: random transforms must not shift training
            with torch.random.fork_rng(devices=[]):
                self._preview = self.feed.first(8)
        real, labels = self._split(self._preview)
        with evaluating(self.model):
            rows = self.model.preview(real, stage, generator=torch.Generator(self.device).manual_seed(self.seed),
                                      **labels)
        path = self.out_dir / f"samples_stage{stage}_step{step}.png"
        save_image(from_model(torch.cat(rows)).cpu(), path, nrow=len(real), padding=1)
        return path

    def _checkpoint(self, run: _Run) -> None:
        """Collective: save the state and, on rank 0, the model with EMA weights and a sample grid."""
        if self.out_dir is None:
            return
        self._save_state(run)
        if self.writes:
            with run.ema.swapped():
                self.model.save(self.out_dir / "model.safetensors")
                self._write_samples(run.stage, run.step)
        if self.distributed:           # nobody goes on (or reads) before the files are there
            dist.barrier()

    def _record(self, run: _Run, loss: torch.Tensor, bar) -> None:
        """Keep the step's loss; log it every ``log_every`` steps, with the images per second since
        the last row."""
        value = loss.item()
        self.losses.append(value)
        if self.rank == 0 and (run.step % self.log_every == 0 or run.step == self.max_steps):
            rate = run.seen / max(time.time() - run.t0, 1e-9)
            if run.log is not None:
                elapsed = time.time() - run.start
                csv.writer(run.log).writerow([run.step, f"{value:.6g}", f"{rate:.1f}", f"{elapsed:.1f}"])
                run.log.flush()
            bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.0f}")
            run.seen, run.t0 = 0, time.time()
        self.elapsed[run.stage] = time.time() - run.start

    # -- training ---------------------------------------------------------------------------------
    def _wrap(self, net):
        """``net`` in DistributedDataParallel when distributed (which also copies rank 0's weights
        to every rank), else ``net`` itself. The defaults suit DKGM stage 2's ``steps + 1`` calls
        per loss: every parameter is used, so its gradient is summed over the calls and all-reduced
        once per backward (tests/test_distributed.py counts it)."""
        if not self.distributed:
            return net
        return DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _start(self, stage: int) -> _Run:
        """The run of ``stage``: fresh, or resumed from its state file."""
        if self.writes:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        net = self.model.stage_module(stage)
        wrapped = self._wrap(net)                  # before the EMA copy: DDP syncs the ranks' weights
        seed = self.seed + stage + 1000 * self.rank   # each rank draws its own noise (and dropout)
        run = _Run(stage, net, wrapped, EMA(net, self.ema_decay), torch.optim.Adam(net.parameters(), lr=self.lr),
                   torch.Generator(self.device).manual_seed(seed), weights_prefix(self.model, net),
                   weights_digest(net.state_dict()))
        torch.default_generator.manual_seed(seed)     # only the generators fit() forks: the CPU's and its device's
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(seed)
        if self.writes and not self.resume:        # so that a run stopped before its first save resumes nothing
            self._state_path(stage).unlink(missing_ok=True)
        if self._resumable(stage):
            run.step = self._load_state(run)
            if self.rank == 0:
                tqdm.write(f"resuming stage {stage} from step {run.step} of {self.max_steps} "
                           f"({self._state_path(stage)})", file=sys.stderr)
        run.start, run.t0 = time.time() - self.elapsed.get(stage, 0.0), time.time()
        run.net._dkgm_run_start = run.start_weights   # this object belongs to that run now (a re-run fit() resumes it)
        return run

    def _retire_records(self) -> None:
        """The model's record of an earlier training run (the calibration made for those weights, the class
        names of that data) no longer describes it once trained here: moved under ``info["warm_start"]``
        (the class names of this data take their place, when it names them), so that the CLI,
        which reads ``info["training"]["data_spec"]``, no longer takes that run's data for this model's
        (a fine-tuned ``digits-tiny`` claimed sklearn digits, and ``precompute`` without ``--data`` used them)."""
        info = getattr(self.model, "info", None)
        if isinstance(info, dict) and ("training" in info or "calibration" in info):
            old = {k: info.pop(k) for k in ("training", "calibration", "classes") if k in info}
            info["warm_start"] = dict(old, earlier=info["warm_start"]) if "warm_start" in info else old
            names = _names(self.data.dataset if isinstance(self.data, torch.utils.data.DataLoader) else self.data)
            if isinstance(names, (list, tuple)):   # the class names of the data it is trained on now, if named
                info["classes"] = [str(c) for c in names]

    def _step(self, run: _Run, batch) -> torch.Tensor:
        """One optimizer step on the batch (``x``, or ``(x, y)`` for a class-conditional model); returns
        the loss, averaged over the ranks."""
        x, labels = self._split(batch)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.amp and self.device.type == "cuda"
                    else nullcontext())
        with autocast, in_place(self.model, run.net, run.wrapped) as model:
            loss = model(x, stage=run.stage, generator=run.gen, **labels)
        mean_loss = mean_over_ranks(loss, self.world_size)
        if not torch.isfinite(mean_loss):
            raise DKGMError(f"stage {run.stage} loss became {mean_loss.item()} at step {run.step}; lower lr "
                            f"(now {self.lr}) or check the data for NaN")
        run.opt.zero_grad(set_to_none=True)
        loss.backward()                            # DDP averages the gradients over the ranks here
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(run.net.parameters(), self.grad_clip)
        run.opt.step()
        run.step += 1
        run.seen += len(x) * self.world_size
        run.ema.update(run.step)                   # the same on every rank, as the weights are
        return mean_loss

    def fit(self, stage: int = 1, max_steps: int | None = None):
        """Train ``stage`` (one of ``model.stages``) for ``max_steps`` steps (default: the
        constructor's), resuming from ``out_dir`` when a state file is there; returns the model
        with the stage's EMA weights. Torch's global random state is the caller's again after it."""
        stages = tuple(self.model.stages)
        if stage not in stages:
            raise DKGMError(f"stage must be {' or '.join(map(str, stages))}, got {stage!r}")
        default = self.max_steps
        if max_steps is not None:       # for this call only: the next fit() trains the constructor's again
            self.max_steps = check_int("max_steps", max_steps, 1)
        # training seeds torch's RNG with its own seed (dropout, random transforms): the caller's stream is
        # put back after, or every model made after a fit started from the same state whatever the caller seeded
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                return self._fit(stage)
        finally:
            self.max_steps = default

    def _fit(self, stage: int):
        run = self._start(stage)
        self._retire_records()
        self.model.train()
        self.losses = []
        log_path = self.out_dir / f"log_stage{stage}.csv" if self.writes else None
        with open_log(log_path, run.step) if log_path else nullcontext() as run.log:
            bar = tqdm(total=self.max_steps, initial=run.step, desc=f"stage {stage}",
                       disable=not (self.progress and self.rank == 0))
            batches = self._batches(run.step, run.stage)
            while run.step < self.max_steps:
                loss = self._step(run, next(batches))
                bar.update(1)
                self._record(run, loss, bar)
                if run.step % self.save_every == 0 or run.step == self.max_steps:
                    self._checkpoint(run)
            bar.close()
        run.ema.copy_to_net()
        return self.model.eval()
