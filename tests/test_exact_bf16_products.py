"""The exact bf16x3 products (W G for a bf16 W through three bf16 GEMMs): exactness of the split,
accuracy against fp64 (ops kept for callers; the merge no longer uses them), the CUDA merge against the CPU one."""

from __future__ import annotations

import pytest
import torch

from regmean_fast import ops

pytestmark = pytest.mark.skipif(not ops.bf16_gemm_compiled(), reason="no MKL bf16 GEMM in this process")


def test_products_are_chosen_only_on_the_mkl_bf16_path(monkeypatch):
    import regmean_fast as rf

    monkeypatch.delenv("REGMEAN_FAST_CPU_GEMM", raising=False)
    monkeypatch.delenv("REGMEAN_FAST_CPU_PATH", raising=False)
    amx = "amx_bf16" in rf.build_info()["cpu_features"].split()
    # Without AMX three bf16 GEMMs are slower than one fp32 GEMM: callers should take fp32 products.
    assert ops.exact_bf16_products_available("cpu") == amx
    for path in ("portable", "blas-sgemm", "avx512bf16", "avx512"):
        if path in rf.build_info()["cpu_paths"].split(", "):
            monkeypatch.setenv("REGMEAN_FAST_CPU_PATH", path)
            assert not ops.exact_bf16_products_available("cpu")
    monkeypatch.setenv("REGMEAN_FAST_CPU_PATH", "mkl-bf16")
    assert ops.exact_bf16_products_available("cpu")


@pytest.mark.parametrize("shape", [(1,), (7, 9), (300, 300)])
def test_split_is_exact(shape):
    g = torch.Generator().manual_seed(1)
    # A wide dynamic range: the split must hold for tiny and huge entries alike.
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 8)
    s = ops.split_bf16x3(x)
    assert s.shape == (3, *shape) and s.dtype == torch.bfloat16
    assert torch.equal(s[0].float() + s[1].float() + s[2].float(), x)
    assert torch.equal(s[0], x.bfloat16())  # the leading slice is plain round-to-nearest


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (70, 130, 33), (257, 300, 129)])
def test_addmm_bf16x3_is_fp32_accurate(transposed, m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    W = torch.randn(m, k, generator=g).bfloat16()
    if transposed:
        W = W.T.contiguous().T  # a column-major view: used in place, as for Conv1D weights
    B = torch.randn(k, n, generator=g)
    C0 = torch.randn(m, n, generator=g)
    C = C0.clone()
    ops.addmm_bf16x3_(C, W, ops.split_bf16x3(B), 0.75)
    expect = C0.double() + 0.75 * W.double() @ B.double()
    fp32 = C0 + 0.75 * (W.float() @ B)
    err = float((C.double() - expect).abs().max())
    err_fp32 = float((fp32.double() - expect).abs().max())
    assert err <= max(2 * err_fp32, 1e-5 * float(expect.abs().max()))


@pytest.fixture
def bf16_llama_merge(tmp_path):
    """Three tiny bf16 Llama folders with their Gram files -> (merge config, the regmean method module)."""
    import importlib

    from test_merge_common import make_activations, make_models, save_model, write_gram_files

    _, models = make_models("llama", k=3, seed=9)
    mods, acts = make_activations(models[0], 3, seed=9)
    paths = [save_model(m.to(torch.bfloat16), tmp_path / f"m{i}") for i, m in enumerate(models)]
    gpaths = write_gram_files(models[0], mods, acts, tmp_path)
    cfg = {"models": [{"model": p, "grams": gp} for p, gp in zip(paths, gpaths)], "out_dtype": "float32",
           "parameters": {"alpha": 0.9}}
    return cfg, importlib.import_module("regmean_fast.merge.methods.regmean")  # regmean_fast.merge is also a function


def test_ops_pass_opcheck():
    x = torch.randn(6, 5)
    torch.library.opcheck(torch.ops.regmean_fast.split_bf16x3.default, (x,))
    torch.library.opcheck(torch.ops.regmean_fast.addmm_bf16x3_.default,
                          (torch.zeros(4, 5), torch.randn(4, 6).bfloat16(), ops.split_bf16x3(x), 0.5))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merge_on_cuda_agrees_with_cpu(bf16_llama_merge, tmp_path):
    """The merge no longer takes the bf16x3 products (its right-hand side is (W_i - W_0) S_i in fp32, see
    regmean_fast.solve); on CUDA it factors with cholesky_ex and must agree with the CPU merge."""
    from test_merge_common import read_folder

    from regmean_fast.merge import merge

    cfg, _ = bf16_llama_merge
    merge(cfg, out=str(tmp_path / "cpu"))
    merge(cfg, out=str(tmp_path / "cuda"), device="cuda")
    cpu, gpu = read_folder(tmp_path / "cpu"), read_folder(tmp_path / "cuda")
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-4, atol=1e-5)
