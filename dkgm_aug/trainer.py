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

Files in ``out_dir``: ``state_stage{1,2}.safetensors`` (the stage network's weights,
EMA, optimizer, step, RNG and the run's settings: written atomically every ``save_every``
steps and at the end), ``model.safetensors`` (the model with EMA weights),
``log_stage{s}.csv`` and ``samples_stage{s}_step{N}.png``.

``fit`` resumes from the stage's state file when there is one (``resume=False`` starts
over and deletes it). A resume never mixes two runs: it is refused when the state was
saved with another model config, ``lr``, ``batch_size``, ``seed`` or data (a hash of the
images), or at a later step than ``max_steps``; it restores only the trained stage's
network (stage 2 learns from blurred real images, independently of stage 1), and drops
the log rows past the resumed step.

Under ``torchrun`` (or an initialised ``torch.distributed``) the trained stage runs
in DistributedDataParallel, ``batch_size`` is the global batch split over the ranks,
and only rank 0 writes files: see docs/distributed.md.
"""
import copy
import csv
import hashlib
import json
import math
import os
import sys
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

from ._validate import check_device, check_float, check_int, check_seed
from .checkpoint import atomic_write
from .errors import CheckpointError, DataError, DKGMError
from .images import collate_images, from_model, to_model
from .nn import evaluating


LOG_HEADER = ["step", "loss", "images_per_s", "elapsed_s"]
START_OVER = "start over with --no-resume (Python: resume=False) or another --work-dir (Python: out_dir=)"


def _arch(config: dict) -> dict:
    """The part of a model config that must match to resume (JSON-normalised, without ``info``)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k != "info"}))


def data_fingerprint(data) -> str:
    """A cheap hash of the training data, kept in the training state so that a resume on other
    data is refused: every byte of a tensor (or of a dataset's ``images`` tensor), else a fixed
    sample of 32 items; nothing for an iterable dataset, or when the sample reads differently
    twice (random transforms that do not use torch's RNG). The caller adds the length."""
    if isinstance(data, torch.utils.data.DataLoader):
        data = data.dataset
    images = data if isinstance(data, torch.Tensor) else getattr(data, "images", None)
    if isinstance(data, torch.utils.data.IterableDataset):
        images = torch.empty(0)
    elif not isinstance(images, torch.Tensor):
        idx = torch.linspace(0, len(data) - 1, min(32, len(data))).round().long().unique().tolist()
        reads = []
        for _ in range(2):
            with torch.random.fork_rng(devices=[]):   # torch-seeded transforms read the same twice
                torch.manual_seed(0)
                reads.append(collate_images([data[i] for i in idx]))
        images = reads[0] if torch.equal(*reads) else torch.empty(0)
    h = hashlib.sha256(f"{tuple(images.shape)} {images.dtype}".encode())
    h.update(images.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    return h.hexdigest()[:16]


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
        batch_size = check_int("batch_size", batch_size, 1)
        lr, ema_decay = check_float("lr", lr), check_float("ema_decay", ema_decay)
        if lr <= 0:
            raise DKGMError(f"lr must be > 0, got {lr!r}")
        if not 0 <= ema_decay < 1:
            raise DKGMError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        if epochs is not None and check_float("epochs", epochs) <= 0:
            raise DKGMError(f"epochs must be > 0, got {epochs!r}")
        max_steps = None if max_steps is None else check_int("max_steps", max_steps, 1)
        grad_clip = check_float("grad_clip", grad_clip, 0)
        save_every, log_every = check_int("save_every", save_every, 1), check_int("log_every", log_every, 1)
        num_workers, seed = check_int("num_workers", num_workers, 0), check_seed(seed)
        device = check_device(device)
        self.rank, self.world_size = init_distributed(device)
        self.distributed = self.world_size > 1
        if batch_size < self.world_size:
            raise DKGMError(f"batch_size is the global batch, split over {self.world_size} processes: "
                            f"it must be >= {self.world_size}, got {batch_size}")
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
        self.data_id = f"{self.n_items} items, sha256 {data_fingerprint(data)}"
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
        self.max_steps = max_steps if max_steps is not None else math.ceil(epochs * self.steps_per_epoch)
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

    def _settings(self, stage: int) -> dict:
        """What a resumed run must share with the run that saved the state: ``{name: (value, where it is set)}``."""
        batch_flag = "--batch-size" if stage == 1 else "--stage2-batch-size or --batch-size"
        return {"lr": (self.lr, "--lr / lr="),
                "batch_size": (self.batch_size, f"{batch_flag} / batch_size="),
                "seed": (self.seed, "--seed / seed="),
                "data": (self.data_id, "--data, --split, --limit, --size, --channels / data=")}

    def _save_state(self, stage, net, ema, opt, gen, step) -> None:
        """Collective: gathers every rank's RNG states; rank 0 writes the file."""
        mine = (gen.get_state(), torch.get_rng_state())
        rngs = [mine]
        if self.distributed:   # each rank draws its own noise, so each rank's state is saved
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, mine)
        if self.rank != 0:
            return
        tensors = {f"model.stage{stage}.{k}": v for k, v in net.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        opt_state = opt.state_dict()
        for idx, st in opt_state["state"].items():
            for key, val in st.items():
                tensors[f"opt.{idx}.{key}"] = torch.as_tensor(val)
        for r, (noise_state, torch_state) in enumerate(rngs):
            tensors[f"rng.noise.{r}"], tensors[f"rng.torch.{r}"] = noise_state, torch_state
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        meta = dict(stage=stage, step=step, max_steps=self.max_steps, world_size=self.world_size,
                    elapsed_s=self.elapsed.get(stage, 0.0), param_groups=opt_state["param_groups"],
                    model_config=self.model.config(), **{k: v for k, (v, _) in self._settings(stage).items()})
        atomic_write(self._state_path(stage), lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))

    def _read_state(self, path: Path) -> tuple[dict, dict]:
        """The metadata and tensors of a state file, refused when it is unreadable or not finite."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if not {"step", "model_config", "param_groups"} <= set(meta):
                raise KeyError("step, model_config or param_groups")
        except Exception as exc:   # safetensors raises its own error types on a cut-off file
            raise CheckpointError(f"cannot read the training state {path} ({type(exc).__name__}: {exc}): it is "
                                  f"truncated or corrupt; delete it, or {START_OVER}") from None
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(f"the training state {path} holds NaN or inf values ({', '.join(bad[:3])}), "
                                  f"so training cannot go on from it; delete it, or {START_OVER}")
        return meta, tensors

    def _check_resume(self, path: Path, meta: dict, stage: int) -> int:
        """The saved step, once the state is known to come from this same run."""
        if _arch(meta["model_config"]) != _arch(self.model.config()):
            raise DKGMError(f"{path} was saved for another model (--preset and the model flags / the model's "
                            f"config); use the same model to resume, or {START_OVER}")
        settings = self._settings(stage)
        missing = [k for k in settings if k not in meta]
        if missing and self.rank == 0:
            warnings.warn(f"{path} was written by an older dkgm_aug that did not record {', '.join(missing)}: "
                          f"resuming, but the settings could not be checked against this run's")
        for key, (value, where) in settings.items():
            if key in meta and meta[key] != value:
                raise DKGMError(f"{path} was saved by a run with {key}={meta[key]!r}, this run has {key}={value!r} "
                                f"({where}): resuming would mix the two runs. Use the saved setting to resume, "
                                f"or {START_OVER}")
        step = int(meta["step"])
        if step > self.max_steps:
            raise DKGMError(f"{path} is at step {step}, more than max_steps={self.max_steps} (--stage{stage}-steps / "
                            f"max_steps=): give at least {step} steps to resume, or {START_OVER}")
        return step

    def _load_state(self, stage, net, ema, opt, gen) -> int:
        """Restore the trained stage's network, EMA, optimizer and RNG; the other stage is left alone
        (state files from older versions hold both stages' weights)."""
        path = self._state_path(stage)
        meta, t = self._read_state(path)
        step = self._check_resume(path, meta, stage)
        prefix = f"model.stage{stage}."
        net.load_state_dict({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)})
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
        return step

    def _open_log(self, stage: int, step: int):
        """The stage's CSV log, open for appending, holding only the rows up to ``step``: a run killed
        after logging a step but before saving it logs that step again when resumed."""
        path = self.out_dir / f"log_stage{stage}.csv"
        rows = []
        if step and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f) if r and r[0].isdigit() and int(r[0]) <= step]

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([LOG_HEADER, *rows])
        atomic_write(path, write)
        return open(path, "a", newline="")

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
        with evaluating(self.model):
            g = torch.Generator(self.device).manual_seed(self.seed)
            kde = self.model.kde(real, generator=g)
            rows = [real, kde.clamp(-1, 1), self.model.debias(kde).clamp(-1, 1)]   # real / stage 1 / stage 1+2
            if stage == 2:
                from .blur import gaussian_blur
                blurred = gaussian_blur(real, sum(self.model.b_range) / 2)
                rows += [blurred, self.model.debias(blurred).clamp(-1, 1)]       # blurred / stage 2 on it
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
            self.max_steps = check_int("max_steps", max_steps, 1)
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
        if main and not self.resume:               # so that a run stopped before its first save resumes nothing
            self._state_path(stage).unlink(missing_ok=True)
        if self._resumable(stage):
            step = self._load_state(stage, net, ema, opt, gen)
            if main:
                tqdm.write(f"resuming stage {stage} from step {step} of {self.max_steps} ({self._state_path(stage)})",
                           file=sys.stderr)
        self.model.train()
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.amp and self.device.type == "cuda"
                    else nullcontext())
        with self._open_log(stage, step) if main else nullcontext() as log_file:
            log = csv.writer(log_file) if main else None
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
