"""The trainer's model contract under DDP for a one-stage model, whose stage trains the whole
model (an EVAE): 2 CPU processes (gloo, 127.0.0.1), started as tests/test_distributed.py does."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

import dkgm_aug
from conftest import shapes_batch
from test_distributed import START, loopback_env

pytestmark = pytest.mark.slow


def _worker(rank, env, tmp):
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.manual_seed(100 + rank)               # DDP must sync the initial weights
    model = dkgm_aug.EVAE(channels=1, image_size=8, d_z=3, widths=(4, 4, 8, 8), M=16)
    try:
        t = dkgm_aug.Trainer(model, shapes_batch(16, size=8), out_dir=f"{tmp}/run", batch_size=8, max_steps=3,
                             save_every=2, log_every=1, progress=False)
        assert t.distributed and t.local_batch == 4
        t.fit(1)
    finally:
        dist.destroy_process_group()
    # BatchNorm statistics are rank 0's (DDP broadcasts them); the weights must agree everywhere
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(dict(hash=digest.hexdigest(), keys=list(model.state_dict()))))


def test_evae_trains_under_ddp(tmp_path):
    ctx = torch.multiprocessing.start_processes(_worker, args=(loopback_env(), str(tmp_path)), nprocs=2,
                                                join=False, start_method=START)
    for _ in range(60):                         # about 120 s; join raises if a rank failed
        if ctx.join(timeout=2):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("the 2-process run did not finish in 120 s")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and not any(k.startswith("module.") for k in r0["keys"])
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "log_stage1.csv", "model.safetensors", "samples_stage1_step2.png", "samples_stage1_step3.png",
        "state_stage1.safetensors"]
    assert isinstance(dkgm_aug.load(run / "model.safetensors"), dkgm_aug.EVAE)
    with safe_open(str(run / "state_stage1.safetensors"), "pt") as f:
        assert "model.encoder.head_mu.weight" in f.keys() and "rng.noise.1" in f.keys()
