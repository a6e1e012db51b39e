import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dkgm_aug import DKGM, UNetConfig

# Tests use tiny tensors: one thread is as fast, and it does not collapse when another
# process holds the second core (OpenMP spin-waits make oversubscription very slow).
torch.set_num_threads(1)


def micro_model(channels: int = 1, image_size=16, **knobs) -> DKGM:
    """A very small DKGM for fast tests (same code path as the presets)."""
    cfg = dict(channels=channels, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,))
    return DKGM(UNetConfig(**cfg, time_input=False), UNetConfig(**cfg, time_input=True),
                image_size=image_size, **knobs)


def shapes_batch(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Synthetic images in [0, 1] with hard edges: random bright rectangles on a dark ground."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(2):
            r0, c0 = torch.randint(0, size - 4, (2,), generator=g).tolist()
            h, w = torch.randint(3, size // 2, (2,), generator=g).tolist()
            x[i, 0, r0:r0 + h, c0:c0 + w] = 0.5 + 0.5 * torch.rand(1, generator=g)
    return x


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> str:
    """An 8x8 micro generator file whose outputs depend on the input and the noise (banks, precompute)."""
    torch.manual_seed(0)
    m = micro_model(image_size=8)
    for stage in (m.stage1, m.stage2):   # zero-initialised output convs would give constant images
        torch.nn.init.normal_(stage.conv_out.weight, std=0.5)
    path = tmp_path_factory.mktemp("gen") / "g.safetensors"
    m.save(path)
    return str(path)


@pytest.fixture
def micro():
    torch.manual_seed(0)
    return micro_model()


def load_benchmark(name: str):
    """A script from benchmarks/ as a module (benchmarks is not a package)."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if str(folder) not in sys.path:           # as when run as `python benchmarks/<name>.py`
        sys.path.insert(0, str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
