"""Bad-input rows of the trainer: resumes that would mix two runs, an unreadable state file,
and a device this machine does not have."""
import torch

from dkgm_aug import CheckpointError, DataError, DKGMError, Trainer
from conftest import micro_model, shapes_batch


def _fit(out, steps=2, data=None, **kw):
    data = shapes_batch(12, size=8) if data is None else data
    Trainer(micro_model(image_size=8), data, out_dir=out, batch_size=4, max_steps=steps, progress=False, **kw).fit(1)


def _resume(out, first=None, **again):
    """Train 2 steps in ``out``, then resume there with ``again`` changed."""
    _fit(out, **(first or {}))
    _fit(out, **dict(dict(steps=4), **again))


def _truncated(out):
    _fit(out)
    path = f"{out}/state_stage1.safetensors"
    with open(path, "r+b") as f:
        f.truncate(200)
    _fit(out, steps=4)


def rows(ckpt, model, tmp):
    table = [
        ("trainer: resume with another lr", lambda: _resume(f"{tmp}/trainer_lr", lr=1e-3), (DKGMError, "--lr / lr=")),
        ("trainer: resume on other data", lambda: _resume(f"{tmp}/trainer_data", data=shapes_batch(12, size=8, seed=1)),
         (DKGMError, "--data")),
        ("trainer: resume with fewer steps than saved", lambda: _resume(f"{tmp}/trainer_steps", dict(steps=4), steps=2),
         (DKGMError, "more than max_steps=2")),
        ("trainer: truncated state file", lambda: _truncated(f"{tmp}/trainer_truncated"),
         (CheckpointError, "truncated or corrupt")),
        ("trainer: uint8 data holding only 0 and 1 (binary images)",
         lambda: _fit(f"{tmp}/trainer_binary", data=(shapes_batch(12, size=8) > 0.5).to(torch.uint8)),
         (DataError, "hold only the values 0 and 1")),
    ]
    if not torch.cuda.is_available():
        table.append(("trainer: device='cuda' without CUDA",
                      lambda: Trainer(micro_model(image_size=8), shapes_batch(4, size=8), out_dir=f"{tmp}/trainer_cuda",
                                      max_steps=1, device="cuda"),
                      (DKGMError, "CUDA is not available")))
    return table
