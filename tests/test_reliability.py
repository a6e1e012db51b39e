"""Faults and load: SIGKILL mid-training then resume; DataLoader workers over time."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

import dkgm_aug
from dkgm_aug import BalancedDKGMDataset, DKGMAugment
from conftest import micro_model


def train_cmd(work, out, steps=60):
    return [sys.executable, "-m", "dkgm_aug.cli", "train", "--data", "digits", "--limit", "96",
            "--stage1-steps", str(steps), "--stage2-steps", "4", "--batch-size", "8", "--save-every", "5",
            "--work-dir", str(work), "--out", str(out), "--quiet", "--seed", "3"]


def saved_step(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])["step"]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    state = tmp_path / "killed" / "state_stage1.safetensors"
    proc = subprocess.Popen(train_cmd(tmp_path / "killed", tmp_path / "killed.safetensors"), env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (state.exists() and saved_step(state) >= 15):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = saved_step(state)                    # the file is whole: it opens and parses
    assert 15 <= killed_at < 60 and killed_at % 5 == 0
    assert not (tmp_path / "killed.safetensors").exists()

    subprocess.run(train_cmd(tmp_path / "killed", tmp_path / "killed.safetensors"), env=env, check=True)
    rows = (tmp_path / "killed" / "log_stage1.csv").read_text().splitlines()
    assert rows[-1].startswith("60,")                # continued to the end
    subprocess.run(train_cmd(tmp_path / "straight", tmp_path / "straight.safetensors"), env=env, check=True)
    a, b = dkgm_aug.load(tmp_path / "killed.safetensors"), dkgm_aug.load(tmp_path / "straight.safetensors")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k    # same weights as the uninterrupted run


class SameImages(torch.utils.data.Dataset):
    """Every item the same image, so any two equal augmented outputs mean repeated noise."""

    def __init__(self, n=24):
        self.targets = [0] * (n - 4) + [1] * 4

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((1, 8, 8), 0.5), self.targets[i]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def run_epochs(ckpt, ctx, epochs=6):
    ds = BalancedDKGMDataset(SameImages(), generator=ckpt, seed=0,
                             transform=DKGMAugment(ckpt, p=1.0, seed=0), progress=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True,
                                         multiprocessing_context=ctx, generator=torch.Generator().manual_seed(0))
    outputs, rss = [], []
    for _ in range(epochs):
        batch = torch.cat([x for x, _ in loader])
        outputs.append(batch)
        pids = [os.getpid()] + [w.pid for w in loader._iterator._workers]
        rss.append(sum(rss_mib(p) for p in pids))
    return outputs, rss


@pytest.mark.slow
@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_dataloader_under_load(tmp_path, ctx):
    torch.manual_seed(0)
    model = micro_model(image_size=8)
    for net in (model.stage1, model.stage2):
        torch.nn.init.normal_(net.conv_out.weight, std=0.5)
    ckpt = str(tmp_path / "g.safetensors")
    model.save(ckpt)
    outputs, rss = run_epochs(ckpt, ctx)
    flat = torch.cat(outputs).flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(flat)      # no two workers/epochs repeated noise
    assert max(rss[2:]) - rss[1] < 30, rss                   # memory flat once caches are warm
    again, _ = run_epochs(ckpt, ctx, epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(outputs[:2], again))   # deterministic with seeds


def test_loading_a_generator_or_evaluator_leaves_the_global_random_stream_alone():
    """load() built the model (random init) before reading its weights: a classifier made after
    torch.manual_seed(0) got other initial weights once any generator had loaded, also through a
    seeded DKGMAugment's first call, so 'with vs without augmentation' runs were not paired."""
    import dkgm_aug
    from dkgm_aug.label_filter import load_evaluator
    torch.manual_seed(0)
    want = torch.rand(4)
    torch.manual_seed(0)
    dkgm_aug.load("digits-tiny")
    dkgm_aug.DKGMAugment("digits-tiny", p=1.0, seed=123)(torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1)))
    load_evaluator("digits-evaluator")
    assert torch.equal(torch.rand(4), want)


def test_training_leaves_the_callers_global_random_stream_alone(tmp_path):
    """fit() seeded torch's global RNG with the Trainer's seed and left it there: replicates seeded
    apart (torch.manual_seed(s)) that train a generator first then got the same classifier init."""
    import dkgm_aug
    from conftest import micro_model, shapes_batch
    inits = []
    for s in (1, 2):
        torch.manual_seed(s)
        model = micro_model(image_size=8)
        dkgm_aug.Trainer(model, shapes_batch(8, size=8), out_dir=None, max_steps=1, batch_size=4,
                         progress=False).fit(stage=1)
        inits.append(torch.rand(3))
    assert not torch.equal(inits[0], inits[1])
    torch.manual_seed(1)
    micro_model(image_size=8)
    assert torch.equal(torch.rand(3), inits[0])        # as if no training had happened in between
