"""``dkgm-aug precompute``: shards of a BalancedDKGMDataset's synthetic set or of a neighbour bank,
identical whatever the split over processes (torchrun, gloo on CPU), resumable shard by shard."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import free_port, loopback_env

from dkgm_aug import BalancedDKGMDataset, NeighbourBank
from dkgm_aug.cli import load_data
from dkgm_aug.data import long_tailed_indices
from dkgm_aug.precompute import precompute

ROOT = Path(__file__).resolve().parents[1]
SPEC = dict(data="digits", split=None, limit=300)   # what `--data digits --limit 300` loads


def lt_digits():
    """The CLI's `--data digits --limit 300 --rho 10`: 194 synthetic images to make."""
    data = load_data(SPEC)
    return data.subset(long_tailed_indices(data.targets, 10, 0))


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shards_load_into_the_dataset(gen, tmp_path):  # noqa: F811
    done = precompute(lt_digits(), gen, tmp_path / "s", shard_size=64, progress=False)
    assert (done["shards"], done["written"], done["complete"]) == (4, 4, True)
    loaded = BalancedDKGMDataset(lt_digits(), gen, progress=False).load_cache(tmp_path / "s")
    made = BalancedDKGMDataset(lt_digits(), gen, progress=False).precompute(progress=False)
    assert loaded.n_generated == made.n_synthetic == 194
    assert all(torch.equal(loaded[i][0], made[i][0]) for i in range(made.n_real, len(made)))


def test_ranks_from_the_environment_split_the_work(gen, tmp_path, monkeypatch):  # noqa: F811
    """Two 'job array' processes (RANK, WORLD_SIZE, no process group) write what one process writes."""
    precompute(lt_digits(), gen, tmp_path / "one", bank_k=3, shard_size=40, progress=False)   # 136 rows: 4 shards
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        done = precompute(lt_digits(), gen, tmp_path / "two", bank_k=3, shard_size=40, progress=False)
        assert (done["rank"], done["mine"], done["written"], done["complete"]) == (rank, 2, 2, None)
    assert files(tmp_path / "one") == files(tmp_path / "two")
    bank = NeighbourBank(lt_digits(), gen, k=3, path=tmp_path / "two")
    memory = NeighbourBank(lt_digits(), gen, k=3).build(progress=False)
    assert bank.built and len(bank) == len(lt_digits()) == 136
    assert all(torch.equal(bank.neighbour(r, 2), memory.neighbour(r, 2)) for r in range(0, len(bank), 17))


def test_killed_run_resumes_shard_by_shard(gen, tmp_path):  # noqa: F811
    out = tmp_path / "s"
    script = (f"import os, signal, sys, torch\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
              "torch.set_num_threads(1)\nfrom test_precompute import lt_digits\n"
              "from dkgm_aug.precompute import precompute\n"
              f"precompute(lt_digits(), {gen!r}, {str(out)!r}, shard_size=64, progress=False,\n"
              "           after_shard=lambda n: os.kill(os.getpid(), signal.SIGKILL))\n")
    res = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr[-3000:]
    first = out / "shard-00000-of-00004.safetensors"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["manifest.json", first.name]
    before = first.stat()
    done = precompute(lt_digits(), gen, out, shard_size=64, progress=False)
    assert (done["written"], done["skipped"], done["complete"]) == (3, 1, True)
    after = first.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)   # not redone
    precompute(lt_digits(), gen, tmp_path / "clean", shard_size=64, progress=False)
    assert files(out) == files(tmp_path / "clean")


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_bit_for_bit(gen, tmp_path):  # noqa: F811
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           **{k: v for k, v in loopback_env().items() if k == "GLOO_SOCKET_IFNAME"}}
    args = ["-m", "dkgm_aug.cli", "precompute", gen, "--data", "digits", "--limit", "300", "--rho", "10",
            "--shard-size", "16", "--quiet"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args,
                          "--out", str(tmp_path / "two")], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "rank 0 of 2: wrote 7 shard(s)" in two.stdout and "rank 1 of 2: wrote 6 shard(s)" in two.stdout
    assert f"{tmp_path / 'two'} is complete" in two.stdout
    assert len(files(tmp_path / "one")) == 14 and files(tmp_path / "one") == files(tmp_path / "two")
    rerun = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "two")], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert "wrote 0 shard(s), skipped 13 finished" in rerun.stdout, rerun.stderr[-3000:]


def test_a_rerun_on_changed_images_is_refused_not_reported_complete(gen, tmp_path):  # noqa: F811
    """The shards' fingerprint holds no pixels: a rerun of precompute on changed images (same labels)
    skipped every shard as finished and said "complete"; a bank served from such a folder passed
    every image through unaugmented under BankAugment(missing="keep")."""
    from dkgm_aug import DKGMError
    data = lt_digits()
    for kind in (dict(), dict(bank_k=1)):
        out = tmp_path / ("bank" if kind else "synth")
        assert precompute(data, gen, out, shard_size=64, progress=False, **kind)["complete"]
        assert precompute(data, gen, out, shard_size=64, progress=False, **kind)["skipped"] > 0   # same data: fine
        changed = data.subset(list(range(len(data))))
        changed.images = 255 - changed.images                                      # every image inverted
        with pytest.raises(DKGMError, match="made from other images"):
            precompute(changed, gen, out, shard_size=64, progress=False, **kind)
    NeighbourBank(changed, gen, k=1, path=tmp_path / "bank2").build(progress=False)   # a folder bank of its own
    with pytest.warns(UserWarning, match="made from other images"):          # reopened: said at once
        NeighbourBank(data, gen, k=1, path=tmp_path / "bank2")


def test_a_rerun_after_a_few_images_changed_is_refused_too(gen, tmp_path):  # noqa: F811
    """Only each finished shard's first row was compared with the data: three changed images, none
    first in its shard, and the rerun skipped every shard and said 'complete'."""
    from dkgm_aug import DKGMError
    data = lt_digits()
    for kind in (dict(), dict(bank_k=1)):
        out = tmp_path / ("bank" if kind else "synth")
        assert precompute(data, gen, out, shard_size=64, progress=False, **kind)["complete"]
        changed = data.subset(list(range(len(data))))
        changed.images = changed.images.clone()
        changed.images[[5, 70, 130]] = 255 - changed.images[[5, 70, 130]]
        with pytest.raises(DKGMError, match="made from other images"):
            precompute(changed, gen, out, shard_size=64, progress=False, **kind)
