"""The trainer under ``torchrun``: joining the process group, values shared over the ranks,
and routing a model's loss through the DistributedDataParallel wrapper of the trained network."""
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


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


def gather(value, world_size: int) -> list:
    """Every rank's ``value`` (a picklable object), in rank order; ``[value]`` in one process."""
    if world_size == 1:
        return [value]
    seen = [None] * world_size
    dist.all_gather_object(seen, value)
    return seen


def mean_over_ranks(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """Mean over ranks (a detached copy), so the NaN check and the log agree on every rank."""
    value = value.detach().float().clone()
    if world_size > 1:
        dist.all_reduce(value)
        value /= world_size
    return value


@contextmanager
def in_place(model: nn.Module, net: nn.Module, wrapped: nn.Module):
    """Yield the module whose call is the training loss, routed through ``wrapped`` (``net`` in
    DistributedDataParallel): ``wrapped`` itself when ``net`` is the whole model, else the model
    with ``wrapped`` put where ``net`` is, so that every call of ``net`` in the loss (DKGM's stage 2
    calls it ``steps + 1`` times) goes through DDP. The plain module comes back after, so
    ``state_dict()`` keys never gain ``module.``."""
    if wrapped is net or net is model:
        yield wrapped if net is model else model
        return
    path = next(name for name, child in model.named_modules() if child is net)
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, name, wrapped)
    try:
        yield model
    finally:
        setattr(parent, name, net)
