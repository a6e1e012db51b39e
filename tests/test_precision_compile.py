"""Opt-in ``dtype=torch.float16`` and ``compile=True`` (DKGMAugment, BalancedDKGMDataset), and the
cache fingerprint's record of the noise scheme. Bad arguments are rows in bad_inputs_*.py; the
fp16 and CUDA checks run only where a GPU is."""
import pickle

import pytest
import torch

from conftest import micro_model
from dkgm_aug import BalancedDKGMDataset, DKGMAugment, DKGMError
from dkgm_aug import cache as cache_file
from dkgm_aug.augment import accelerate
from dkgm_aug.kernels import NOISE_SCHEME

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Items(torch.utils.data.Dataset):
    def __init__(self, labels, size=8):
        self.labels = list(labels)
        self.x = torch.rand(len(self.labels), 1, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], self.labels[i]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return micro_model(image_size=8)


def test_accelerate_copies_and_leaves_the_model_alone(model):
    assert accelerate(model) is model
    fast = accelerate(model, compile=True)
    assert fast is not model and all(getattr(n, "_compiled_call_impl", None) is not None for n in fast.children())
    assert all(getattr(n, "_compiled_call_impl", None) is None for n in model.children())
    half = accelerate(model, dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16 and next(model.parameters()).dtype == torch.float32


def test_compile_on_cpu_gives_the_eager_images(model):
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    eager, fast = DKGMAugment(model, seed=3), DKGMAugment(model, seed=3, compile=True)
    for batch in (x, x[:4]):                     # a second batch size: compiled again, with a symbolic batch
        params = eager.make_params([batch])
        want, got = eager.transform(batch, params), fast.transform(batch, params)
        assert (got - want).abs().max() <= 1e-4
    assert pickle.loads(pickle.dumps(fast)).handle._model is None   # the compiled copy stays behind
    assert getattr(model.stage1, "_compiled_call_impl", None) is None


def test_precompute_with_compile_matches_and_shares_the_cache(model, tmp_path):
    ds = Items([0] * 4 + [1] * 2)
    path = tmp_path / "c.safetensors"
    plain = BalancedDKGMDataset(ds, model, progress=False).precompute(progress=False)
    fast = BalancedDKGMDataset(ds, model, progress=False, compile=True, cache=path).precompute(progress=False)
    for j in range(plain.n_synthetic):
        assert (plain[plain.n_real + j][0].float() - fast[fast.n_real + j][0].float()).abs().max() <= 1 / 255 + 1e-6
    assert fast.fingerprint() == plain.fingerprint()        # compile is float rounding: not fingerprinted
    assert BalancedDKGMDataset(ds, model, progress=False, cache=path).n_generated == plain.n_synthetic
    assert pickle.loads(pickle.dumps(fast))._model is None          # workers compile their own


def test_compile_refused_clearly_when_the_machine_cannot_compile(model, monkeypatch):
    import torch._dynamo
    import torch._inductor.config as inductor
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    torch._dynamo.reset()
    try:
        msg = r"compile=True: torch.compile could not compile the generator on cpu \(.*C\+\+ compiler.*compile=False"
        with pytest.raises(DKGMError, match=msg):
            DKGMAugment(model, seed=0, compile=True)(torch.rand(2, 1, 8, 8))
    finally:
        torch._dynamo.reset()


def test_fingerprint_records_the_noise_scheme_and_old_caches_are_refused(model, tmp_path):
    ds = Items([0] * 4 + [1] * 2)
    path = tmp_path / "old.safetensors"
    made = BalancedDKGMDataset(ds, model, progress=False, cache=path).precompute(progress=False)
    fp = made.fingerprint()
    assert fp["noise_scheme"] == NOISE_SCHEME and fp["dtype"] is None
    old = {k: v for k, v in fp.items() if k not in ("noise_scheme", "dtype")}   # as dkgm_aug wrote it before
    images = torch.stack([made._cache[j] for j in range(made.n_synthetic)])
    path.unlink()
    cache_file.write(path, images, made._digests, old)
    with pytest.raises(DKGMError, match=r"differs in \['noise_scheme'\].*delete it or pass a new cache path"):
        BalancedDKGMDataset(ds, model, progress=False, cache=path)


@cuda
def test_fp16_and_compile_on_cuda(model):
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(2)).cuda()
    ref = DKGMAugment(model, seed=5, device="cuda")
    params = ref.make_params([x])
    want = ref.transform(x, params)
    for kw in (dict(dtype=torch.float16), dict(compile=True), dict(dtype=torch.float16, compile=True)):
        got = DKGMAugment(model, seed=5, device="cuda", **kw).transform(x, params)
        assert got.dtype == x.dtype and got.device == x.device
        assert (got - want).abs().max() <= 2 / 255, kw
    assert next(model.parameters()).dtype == torch.float32


@cuda
def test_fp16_dataset_on_cuda_is_fingerprinted(model, tmp_path):
    ds = Items([0] * 4 + [1] * 2)
    path = tmp_path / "c.safetensors"
    BalancedDKGMDataset(ds, model, progress=False, device="cuda", cache=path).precompute(progress=False)
    with pytest.raises(DKGMError, match=r"differs in \['dtype'\]"):
        BalancedDKGMDataset(ds, model, progress=False, device="cuda", cache=path, dtype=torch.float16)
    half = BalancedDKGMDataset(ds, model, progress=False, device="cuda", dtype=torch.float16)
    assert half.fingerprint()["dtype"] == "float16"
    with pytest.raises(DKGMError, match="CUDA only"):
        half.precompute(device="cpu", progress=False)
    half.precompute(progress=False)
    assert half.n_generated == half.n_synthetic
