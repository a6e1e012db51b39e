"""The trainer and ``dkgm-aug train`` with 2 CPU processes (gloo, 127.0.0.1).

The trainer runs are started with torch.multiprocessing (fork where there is fork: the children
skip re-importing torch, which takes most of a launch) and join the process group from torchrun's
environment variables, as under torchrun; the CLI runs under a real ``torchrun``.
"""
import csv
import hashlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

import dkgm_aug
import dkgm_aug.trainer as trainer_module
from conftest import micro_model, shapes_batch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
START = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env() -> dict:
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"              # keep gloo on the loopback interface
    return env


def _worker(rank, env, tmp, phase):
    """One rank. Its model starts from its own seed (DDP must sync the weights); it counts the
    gradient elements DDP all-reduces and the files it opens for writing, and writes
    ``{phase}.rank{r}.json`` with a hash of its trained weights."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    writes, reduced = [], [0]

    def audit(event, args):
        if event in ("open", "os.mkdir") and str(args[0]).startswith(tmp):
            if event == "os.mkdir" or args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                writes.append(str(args[0]))
    sys.addaudithook(audit)

    class CountingDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

            def hook(state, bucket):
                reduced[0] += sum(p.numel() for p in bucket.parameters())
                return default_hooks.allreduce_hook(None, bucket)
            self.register_comm_hook(None, hook)
    trainer_module.DistributedDataParallel = CountingDDP

    def fit(out, steps, start=0):
        torch.manual_seed(100 + rank)
        model = micro_model()
        t = dkgm_aug.Trainer(model, shapes_batch(16), out_dir=f"{tmp}/{out}", batch_size=8, max_steps=steps,
                             save_every=2, log_every=1, progress=False)
        assert t.distributed and t.local_batch == 4
        reduced[0] = 0
        t.fit(1)
        # the gradients are all-reduced exactly once per step
        assert reduced[0] == (steps - start) * sum(p.numel() for p in model.stage1.parameters()), reduced
        return model

    def shards():
        """Each rank's items in the 2 steps of an epoch: disjoint, and together the whole data."""
        ids = (torch.arange(16, dtype=torch.uint8) * 16).view(16, 1, 1, 1).expand(16, 1, 8, 8)   # image i is all 16 i
        batches = dkgm_aug.Trainer(micro_model(image_size=8), ids, batch_size=8, max_steps=2,
                                   progress=False)._batches(0)
        mine = [(((next(batches)[:, 0, 0, 0] + 1) * 127.5).round().int() // 16).tolist() for _ in range(2)]
        everyone = [None, None]
        dist.all_gather_object(everyone, mine)
        for step in range(2):
            assert len(set(everyone[0][step] + everyone[1][step])) == 8, everyone
        assert sorted(sum(everyone[0] + everyone[1], [])) == list(range(16)), everyone

    try:
        if phase == "first":
            shards()
            fit("full", 4)
            model = fit("part", 2)
        else:
            model = fit("part", 4, start=2)                  # resumes from step 2
    finally:
        dist.destroy_process_group()
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.stage1.state_dict().values()))
    result = json.dumps(dict(hash=digest.hexdigest(), writes=writes))
    Path(tmp, f"{phase}.rank{rank}.json").write_text(result)


def run_two(tmp_path, phase):
    ctx = torch.multiprocessing.start_processes(_worker, args=(loopback_env(), str(tmp_path), phase), nprocs=2,
                                                join=False, start_method=START)
    deadline = time.time() + 120
    while not ctx.join(timeout=2):                        # raises if a rank failed
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-process run ({phase}) did not finish in 120 s")
    return [json.loads((tmp_path / f"{phase}.rank{r}.json").read_text()) for r in (0, 1)]


def weights(path):
    return dkgm_aug.load(path).state_dict()


def test_two_processes_train_write_once_and_resume(tmp_path):
    part = tmp_path / "part"
    first = run_two(tmp_path, "first")
    rows = list(csv.DictReader(open(part / "log_stage1.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(float(r["loss"]) > 0 for r in rows)
    init = weights(part / "model.safetensors")

    second = run_two(tmp_path, "second")                 # new processes: continue part/ to step 4
    for r0, r1 in (first, second):
        assert r0["hash"] == r1["hash"]                  # DDP kept the ranks' weights identical
        assert r0["writes"] and r1["writes"] == []       # and only rank 0 wrote files
    assert sorted(p.name for p in part.iterdir()) == [
        "log_stage1.csv", "model.safetensors", "samples_stage1_step2.png", "samples_stage1_step4.png",
        "state_stage1.safetensors"]                      # one set of files, no temporaries left
    rows = list(csv.DictReader(open(part / "log_stage1.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]   # continued, not restarted
    resumed, full = weights(part / "model.safetensors"), weights(tmp_path / "full" / "model.safetensors")
    assert any(not torch.equal(init[k], v) for k, v in resumed.items())
    for k, v in full.items():                           # 2 + 2 resumed steps == 4 uninterrupted steps
        assert torch.allclose(v, resumed[k], atol=1e-6), k
    with safe_open(str(part / "state_stage1.safetensors"), "pt") as f:
        assert not torch.equal(f.get_tensor("rng.noise.0"), f.get_tensor("rng.noise.1"))   # noise per rank


def test_cli_under_torchrun(tmp_path):
    env = {k: v for k, v in loopback_env().items() if k in ("OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "dkgm_aug.cli", "train", "--data", "digits", "--limit", "32", "--stage1-steps", "2",
           "--stage2-steps", "1", "--batch-size", "8", "--quiet", "--work-dir", str(tmp_path / "run"),
           "--out", str(tmp_path / "gen.safetensors")]
    env.update(PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, env={**os.environ, **env}, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1              # only rank 0 prints
    training = dkgm_aug.load(tmp_path / "gen.safetensors").info["training"]
    assert training["world_size"] == 2 and training["batch_size"] == {"1": 8, "2": 8}
    assert "2 processes" in training["hardware"]
