"""Trainer for both DKGM stages: EMA, gradient clipping, AMP on CUDA, CSV log,
sample grids, and resumable training state.

Example::

    model = DKGM.from_preset("tiny", image_size=28, channels=1)
    trainer = Trainer(model, dataset, out_dir="runs/fmnist", batch_size=64, max_steps=2000)
    trainer.fit(stage=1)
    trainer.fit(stage=2)
    model.save("gen.safetensors")

``data`` is a tensor ``[N, C, H, W]`` (uint8, or float in [0, 1]), a map-style
Dataset of images or ``(image, label)`` pairs, or a DataLoader. For tensors and
Datasets the batch order is a seeded permutation per epoch, so a resumed run sees
the same batches as an uninterrupted one; a DataLoader is iterated as given.

Files in ``out_dir``: ``state_stage{1,2}.safetensors`` (weights, EMA, optimizer,
step, RNG: written atomically every ``save_every`` steps and at the end; ``fit``
resumes from it), ``model.safetensors`` (the model with EMA weights),
``log_stage{s}.csv`` and ``samples_stage{s}_step{N}.png``.

Under ``torchrun`` (or an initialised ``torch.distributed``) the trained stage runs
in DistributedDataParallel, ``batch_size`` is the global batch split over the ranks,
and only rank 0 writes files: see docs/distributed.md.
"""
import copy
import csv
import json
import math
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .checkpoint import atomic_write
from .errors import DataError, DKGMError
from .images import collate_images, from_model, to_model


def _arch(config: dict) -> dict:
    """The part of a model config that must match to resume (JSON-normalised, without ``info``)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k != "info"}))


def init_distributed(device=None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process. Joins the process group that ``torchrun``
    describes in the environment (``WORLD_SIZE`` > 1 and ``RANK``) unless one is initialised
    already: NCCL when training on CUDA, else gloo. ``(0, 1)`` when not distributed."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
            return 0, 1
        cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        if cuda:   # one GPU per process; NCCL collectives use the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size()


class Trainer:
    def __init__(self, model, data, out_dir="runs/dkgm", batch_size: int = 64, max_steps: int | None = None,
                 epochs: float | None = None, lr: float = 3e-4, ema_decay: float = 0.999, grad_clip: float = 1.0,
                 amp: bool | None = None, save_every: int = 500, log_every: int = 10, seed: int = 0,
                 device=None, num_workers: int = 0, progress: bool = True, resume: bool = True):
        if (max_steps is None) == (epochs is None):
            raise DKGMError("give exactly one of max_steps or epochs")
        if batch_size < 1:
            raise DKGMError(f"batch_size must be >= 1, got {batch_size}")
        self.rank, self.world_size = init_distributed(device)
        self.distributed = self.world_size > 1
        if batch_size < self.world_size:
            raise DKGMError(f"batch_size is the global batch, split over {self.world_size} processes: "
                            f"it must be >= {self.world_size}, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.distributed and self.device.type == "cuda":   # one GPU per process
            if self.device.index is None:
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
            torch.cuda.set_device(self.device)
        self.model = model.to(self.device)
        self.out_dir = Path(out_dir)
        self.batch_size, self.lr, self.ema_decay, self.grad_clip = batch_size, lr, ema_decay, grad_clip
        self.amp = (self.device.type == "cuda") if amp is None else bool(amp)
        self.save_every, self.log_every, self.seed = save_every, log_every, seed
        self.num_workers, self.progress, self.resume = num_workers, progress, resume
        self.data = data
        self.n_items = self._check_data()
        # Every global batch has min(batch_size, n_items) items; each rank takes an equal slice.
        global_batch = min(batch_size, self.n_items)
        self.local_batch = global_batch // self.world_size
        if self.local_batch < 1:
            raise DataError(f"{self.n_items} training items cannot be split over {self.world_size} processes")
        if isinstance(data, torch.utils.data.DataLoader):      # batches as the loader makes them
            if self.distributed and not isinstance(data.sampler, torch.utils.data.DistributedSampler):
                if self.rank == 0:
                    warnings.warn("under torch.distributed a DataLoader needs a DistributedSampler, "
                                  "or every process trains on the same batches")
        elif global_batch % self.world_size and self.rank == 0:
            warnings.warn(f"a batch of {global_batch} does not split evenly over {self.world_size} processes: "
                          f"each takes {self.local_batch} and the other {global_batch % self.world_size} are skipped")
        self.steps_per_epoch = max(1, self.n_items // batch_size)
        self.max_steps = int(max_steps) if max_steps is not None else math.ceil(epochs * self.steps_per_epoch)
        if self.max_steps < 1:
            raise DKGMError(f"training needs at least one step, got max_steps={self.max_steps}")
        self._preview = None
        self.elapsed = {}        # training seconds per stage, summed over resumed runs

    # -- data -------------------------------------------------------------------------------------
    def _check_data(self) -> int:
        data = self.data
        if isinstance(data, torch.Tensor):
            if data.ndim != 4:
                raise DataError(f"a data tensor must be [N, C, H, W], got shape {tuple(data.shape)}")
            n = len(data)
        elif isinstance(data, torch.utils.data.DataLoader):
            n = len(data.dataset)
        elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
            n = len(data)
        else:
            raise DataError(f"data must be a tensor, a map-style Dataset or a DataLoader, got {type(data).__name__}")
        if n == 0:
            raise DataError("the training data is empty")
        first = self._first_batch(1)
        if first.shape[1] != self.model.channels:
            raise DataError(f"the data has {first.shape[1]} channels but the model takes {self.model.channels}; "
                            "build the model with channels= matching the data, or convert the images")
        return n

    def _first_batch(self, k: int) -> torch.Tensor:
        if isinstance(self.data, torch.Tensor):
            return self._as_batch(self.data[:k])
        if isinstance(self.data, torch.utils.data.DataLoader):
            return self._as_batch(next(iter(self.data)))[:k]
        return self._as_batch(collate_images([self.data[i] for i in range(min(k, len(self.data)))]))

    def _as_batch(self, batch) -> torch.Tensor:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            batch = collate_images(batch)
        x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        return to_model(x).to(self.device, non_blocking=True)

    def _batches(self, start_step: int):
        """Yield this rank's model-range batches from ``start_step`` on, forever."""
        if isinstance(self.data, torch.utils.data.DataLoader):
            epoch = start_step // max(1, len(self.data))
            while True:
                if hasattr(self.data.sampler, "set_epoch"):   # DistributedSampler: reshuffle each epoch
                    self.data.sampler.set_epoch(epoch)
                for batch in self.data:
                    yield self._as_batch(batch)
                epoch += 1
        step = start_step
        while True:
            epoch, offset = divmod(step, self.steps_per_epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n_items, generator=g)   # the same on every rank: same seed
            lo = self.rank * self.local_batch                  # this rank's slice of each global batch
            plan = [perm[i * self.batch_size:(i + 1) * self.batch_size][lo:lo + self.local_batch]
                    for i in range(offset, self.steps_per_epoch)]
            if isinstance(self.data, torch.Tensor):
                for idx in plan:
                    yield self._as_batch(self.data[idx])
            else:
                loader = torch.utils.data.DataLoader(self.data, batch_sampler=[i.tolist() for i in plan],
                                                     num_workers=self.num_workers, collate_fn=collate_images)
                for batch in loader:
                    yield self._as_batch(batch)
            step += len(plan)

    # -- state ------------------------------------------------------------------------------------
    def _state_path(self, stage: int) -> Path:
        return self.out_dir / f"state_stage{stage}.safetensors"

    def _save_state(self, stage, net, ema, opt, gen, step) -> None:
        """Collective: gathers every rank's RNG states; rank 0 writes the file."""
        mine = (gen.get_state(), torch.get_rng_state())
        rngs = [mine]
        if self.distributed:   # each rank draws its own noise, so each rank's state is saved
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, mine)
        if self.rank != 0:
            return
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        opt_state = opt.state_dict()
        for idx, st in opt_state["state"].items():
            for key, val in st.items():
                tensors[f"opt.{idx}.{key}"] = torch.as_tensor(val)
        for r, (noise_state, torch_state) in enumerate(rngs):
            tensors[f"rng.noise.{r}"], tensors[f"rng.torch.{r}"] = noise_state, torch_state
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        meta = dict(stage=stage, step=step, max_steps=self.max_steps, seed=self.seed, world_size=self.world_size,
                    elapsed_s=self.elapsed.get(stage, 0.0),
                    param_groups=opt_state["param_groups"], model_config=self.model.config())
        atomic_write(self._state_path(stage), lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))

    def _load_state(self, stage, net, ema, opt, gen) -> int:
        path = self._state_path(stage)
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        if _arch(meta["model_config"]) != _arch(self.model.config()):
            raise DKGMError(f"{path} was written for another model config; use a new out_dir or resume=False")
        self.model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
        state = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v.to(self.device) if key != "step" else v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        for name, set_state in (("noise", gen.set_state), ("torch", torch.set_rng_state)):
            # "rng.noise"/"rng.torch": single-process files from before; a rank the file lacks
            # (more processes than the run that wrote it) keeps its fresh seed
            saved = t.get(f"rng.{name}.{self.rank}", t.get(f"rng.{name}") if self.rank == 0 else None)
            if saved is not None:
                set_state(saved)
        self.elapsed[stage] = float(meta.get("elapsed_s", 0.0))
        return int(meta["step"])

    @contextmanager
    def _swapped(self, net, ema):
        """Run with the EMA weights in ``net``, restoring the live weights after."""
        live = copy.deepcopy(net.state_dict())
        net.load_state_dict(ema.state_dict())
        try:
            yield
        finally:
            net.load_state_dict(live)

    # -- outputs ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _write_samples(self, stage: int, step: int) -> Path:
        from torchvision.utils import save_image
        if self._preview is None:
            self._preview = self._first_batch(8)
        real = self._preview
        was_training = self.model.training
        self.model.eval()
        g = torch.Generator(self.device).manual_seed(self.seed)
        kde = self.model.kde(real, generator=g)
        rows = [real, kde.clamp(-1, 1), self.model.debias(kde).clamp(-1, 1)]   # real / stage 1 / stage 1+2
        if stage == 2:
            from .blur import gaussian_blur
            blurred = gaussian_blur(real, sum(self.model.b_range) / 2)
            rows += [blurred, self.model.debias(blurred).clamp(-1, 1)]       # blurred / stage 2 on it
        self.model.train(was_training)
        path = self.out_dir / f"samples_stage{stage}_step{step}.png"
        save_image(from_model(torch.cat(rows)).cpu(), path, nrow=len(real), padding=1)
        return path

    # -- distributed ------------------------------------------------------------------------------
    def _wrap(self, net):
        """``net`` in DistributedDataParallel when distributed (which also copies rank 0's weights
        to every rank), else ``net`` itself. The defaults suit stage 2's ``steps + 1`` calls per
        loss: every parameter is used, so its gradient is summed over the calls and all-reduced
        once per backward (tests/test_distributed.py counts it)."""
        if not self.distributed:
            return net
        return DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @contextmanager
    def _in_place(self, stage: int, wrapped):
        """Put ``wrapped`` where ``model.kde``/``model.debias`` look for the stage network, so every
        call of the loss (stage 2 calls it ``steps + 1`` times) goes through DDP; the plain module
        comes back after, so ``state_dict()`` keys never gain ``module.``."""
        name = f"stage{stage}"
        plain = getattr(self.model, name)
        setattr(self.model, name, wrapped)
        try:
            yield
        finally:
            setattr(self.model, name, plain)

    def _mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (a detached copy), so the NaN check and the log agree on every rank."""
        value = value.detach().float().clone()
        if self.distributed:
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def _resumable(self, stage: int) -> bool:
        found = self.resume and self._state_path(stage).exists()
        if self.distributed:
            seen = [None] * self.world_size
            dist.all_gather_object(seen, found)
            if len(set(seen)) > 1:   # every rank raises, so none is left waiting in a collective
                ranks = [r for r, f in enumerate(seen) if f]
                raise DKGMError(f"{self._state_path(stage)} exists for ranks {ranks} only: "
                                "out_dir must be on a filesystem that all nodes share")
        return found

    # -- training ---------------------------------------------------------------------------------
    def fit(self, stage: int = 1, max_steps: int | None = None):
        """Train ``stage`` (1 or 2) for ``max_steps`` steps (default: the constructor's), resuming
        from ``out_dir`` when a state file is there; returns the model with the stage's EMA weights."""
        if stage not in (1, 2):
            raise DKGMError(f"stage must be 1 or 2, got {stage!r}")
        if max_steps is not None:
            if max_steps < 1:
                raise DKGMError(f"max_steps must be >= 1, got {max_steps}")
            self.max_steps = int(max_steps)
        main = self.rank == 0                      # only rank 0 writes files and shows progress
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        net = self.model.stage1 if stage == 1 else self.model.stage2
        wrapped = self._wrap(net)                  # before the EMA copy: DDP syncs the ranks' weights
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        seed = self.seed + stage + 1000 * self.rank   # each rank draws its own noise (and dropout)
        gen = torch.Generator(self.device).manual_seed(seed)
        torch.manual_seed(seed)
        step = 0
        if self._resumable(stage):
            step = self._load_state(stage, net, ema, opt, gen)
        self.model.train()
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.amp and self.device.type == "cuda"
                    else nullcontext())
        log_path = self.out_dir / f"log_stage{stage}.csv"
        new_log = not log_path.exists() or step == 0
        with open(log_path, "w" if new_log else "a", newline="") if main else nullcontext() as log_file:
            log = csv.writer(log_file) if main else None
            if main and new_log:
                log.writerow(["step", "loss", "images_per_s", "elapsed_s"])
            bar = tqdm(total=self.max_steps, initial=step, desc=f"stage {stage}",
                       disable=not (self.progress and main))
            start, seen, t0 = time.time() - self.elapsed.get(stage, 0.0), 0, time.time()
            batches = self._batches(step)
            while step < self.max_steps:
                x = next(batches)
                with autocast, self._in_place(stage, wrapped):
                    loss = self.model(x, stage=stage, generator=gen)
                mean_loss = self._mean(loss)
                if not torch.isfinite(mean_loss):
                    raise DKGMError(f"stage {stage} loss became {mean_loss.item()} at step {step}; lower lr "
                                    f"(now {self.lr}) or check the data for NaN")
                opt.zero_grad(set_to_none=True)
                loss.backward()                    # DDP averages the gradients over the ranks here
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), self.grad_clip)
                opt.step()
                step += 1
                seen += len(x) * self.world_size
                decay = min(self.ema_decay, (1 + step) / (10 + step))   # warm-up: short runs still get EMA
                with torch.no_grad():              # the same on every rank, as the weights are
                    for pe, p in zip(ema.parameters(), net.parameters()):
                        pe.lerp_(p, 1 - decay)
                    for be, b in zip(ema.buffers(), net.buffers()):
                        be.copy_(b)
                bar.update(1)
                if main and (step % self.log_every == 0 or step == self.max_steps):
                    rate = seen / max(time.time() - t0, 1e-9)
                    log.writerow([step, f"{mean_loss.item():.6g}", f"{rate:.1f}", f"{time.time() - start:.1f}"])
                    log_file.flush()
                    bar.set_postfix(loss=f"{mean_loss.item():.4f}", img_s=f"{rate:.0f}")
                    seen, t0 = 0, time.time()
                self.elapsed[stage] = time.time() - start
                if step % self.save_every == 0 or step == self.max_steps:
                    self._save_state(stage, net, ema, opt, gen, step)
                    if main:
                        with self._swapped(net, ema):
                            self.model.save(self.out_dir / "model.safetensors")
                            self._write_samples(stage, step)
                    if self.distributed:           # nobody goes on (or reads) before the files are there
                        dist.barrier()
            bar.close()
        net.load_state_dict(ema.state_dict())
        return self.model.eval()
