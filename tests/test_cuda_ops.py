"""CUDA kernels against fp64 references (run on a GPU machine by benchmarks/gpu_check.sh).

Every output buffer is poisoned before the op runs (NaN below the diagonal of G, NaN-filled
results), sizes are random and mostly not multiples of the tiles (64 for gram_update, 32 for
gram_reduce), and both Gram kernels are checked (the tensor-core one and the fp32-FMA fallback,
forced with REGMEAN_FAST_CUDA_GEMM=fma).
"""

from __future__ import annotations

import os

import pytest
import torch

from regmean_fast import _ext, ops
from regmean_fast.solve import robust_spd_solve

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DIMS = (1, 17, 130, 257, 1000)
ROWS = (1, 33, 4100)


def _need(flag: str):
    if not getattr(_ext, flag, False) and not (flag == "HAS_SPD_SOLVE_OP" and ops.HAS_SPD_SOLVE_OP):
        pytest.skip(f"the compiled extension lacks {flag}")


def _ref_gram(X: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = X.reshape(-1, X.size(-1)).double()
    if mask is not None:
        x = x[mask.expand(X.shape[:-1]).reshape(-1)]
    return torch.triu(x.T @ x)


@pytest.fixture(params=["wmma", "fma"])
def gemm_path(request, monkeypatch):
    if request.param == "fma":
        monkeypatch.setenv("REGMEAN_FAST_CUDA_GEMM", "fma")
    else:
        monkeypatch.delenv("REGMEAN_FAST_CUDA_GEMM", raising=False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_gram_update_cuda_vs_fp64(gemm_path, dtype, d, rows):
    if dtype == torch.float32 and gemm_path == "wmma":
        pytest.skip("fp32 X takes the FMA kernel on either setting")
    g = torch.Generator().manual_seed(d * 7919 + rows)
    X = torch.randn(rows, d, generator=g).to(dtype).cuda()
    mask = (torch.rand(rows, generator=g) > 0.3).cuda()
    G0 = torch.randn(d, d, generator=g).cuda()
    G = G0.clone()
    G.masked_fill_(torch.ones(d, d, dtype=torch.bool, device="cuda").tril(-1), float("nan"))  # poison
    ops.gram_update(G, X, mask)
    torch.cuda.synchronize()
    assert torch.isnan(G.tril(-1)).sum() == d * (d - 1) // 2, "the strict lower triangle was written"
    ref = _ref_gram(X, mask) + torch.triu(G0.double())
    got = torch.triu(G.nan_to_num(0.0)).double()
    scale = ref.abs().max().clamp_min(1.0)
    tol = 1e-5  # fp32 accumulation of exact 16-bit products
    assert float((got - ref).abs().max() / scale) < tol


@pytest.mark.parametrize("d", (17, 130))
def test_gram_update_cuda_strided_batched_input(gemm_path, d):
    g = torch.Generator().manual_seed(d)
    base = torch.randn(3, 50, d + 5, generator=g).to(torch.bfloat16).cuda()
    X = base[..., 2 : 2 + d]  # row stride d + 5, not contiguous
    mask = (torch.rand(3, 50, generator=g) > 0.5).cuda()
    G = torch.zeros(d, d, device="cuda")
    ops.gram_update(G, X, mask)
    ref = _ref_gram(X, mask)
    assert float((torch.triu(G).double() - ref).abs().max() / ref.abs().max()) < 1e-5
    # An all-false mask is a no-op.
    before = G.clone()
    ops.gram_update(G, X, torch.zeros(3, 50, dtype=torch.bool, device="cuda"))
    assert torch.equal(G, before)


def test_gram_update_cuda_split_rows_deterministic_sum():
    # Few tiles, many rows: the row dimension is split across blocks (atomicAdd path).
    d, rows = 40, 20000
    X = torch.randn(rows, d, device="cuda").to(torch.bfloat16)
    G = torch.zeros(d, d, device="cuda")
    ops.gram_update(G, X)
    ref = _ref_gram(X, None)
    assert float((torch.triu(G).double() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("d", DIMS)
def test_symmetrize_cuda(d):
    G = torch.randn(d, d, device="cuda")
    want = torch.triu(G) + torch.triu(G, 1).T
    G.masked_fill_(torch.ones(d, d, dtype=torch.bool, device="cuda").tril(-1), float("nan"))
    ops.symmetrize_(G)
    assert torch.equal(G, want)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", (1, 17, 33, 130, 257))
@pytest.mark.parametrize("k", (1, 3, 40))  # 40 > one launch's 32 Grams: chunked accumulation
def test_gram_reduce_cuda_vs_cpu_op_and_fp64(packed, out_dtype, d, k):
    _need("HAS_CUDA_REDUCE")
    g = torch.Generator().manual_seed(d * 31 + k)
    grams = []
    for _ in range(k):
        m = torch.randn(d, d, generator=g)
        m = m + m.T
        if not packed:
            m.masked_fill_(torch.ones(d, d, dtype=torch.bool).tril(-1), float("nan"))  # never read
        grams.append(m)
    factors = torch.rand(k, generator=g).tolist()
    alpha = 0.7
    cpu_in = [ops.pack_triu(m.nan_to_num(0.0)) if packed else m for m in grams]
    cuda_in = [t.cuda() for t in cpu_in]
    got = ops.gram_reduce(cuda_in, factors, alpha, out_dtype)
    assert got.device.type == "cuda" and got.dtype == out_dtype and got.shape == (d, d)
    want_cpu = ops.gram_reduce(cpu_in, factors, alpha, out_dtype)
    full = [torch.triu(m.nan_to_num(0.0)).double() for m in grams]
    full = [t + torch.triu(t, 1).T for t in full]
    ref = ops.reduce_expression(full, factors, alpha, torch.float64)
    got_c = got.cpu()
    assert torch.equal(got_c, got_c.T), "output not exactly symmetric"
    tol = 1e-12 if out_dtype == torch.float64 else 1e-5
    scale = float(ref.abs().max()) or 1.0
    assert float((got_c.double() - ref).abs().max()) / scale < tol * k
    assert float((got_c.double() - want_cpu.double()).abs().max()) / scale < tol * k


@pytest.mark.parametrize("d", DIMS)
def test_pack_unpack_cuda(d):
    _need("HAS_CUDA_REDUCE")
    G = torch.randn(d, d, device="cuda")
    p = ops.pack_triu(G)
    assert torch.equal(p.cpu(), ops.pack_triu(G.cpu()))
    U = ops.unpack_triu(p)
    assert torch.equal(U, torch.triu(G) + torch.triu(G, 1).T)


def _spd(n: int, dtype, cond: float = 1e3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return ((Q * ev) @ Q.T).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,k", [(1, 1), (17, 3), (130, 1), (257, 300), (1000, 64)])
def test_spd_solve_cuda_vs_fp64(dtype, n, k):
    _need("HAS_SPD_SOLVE_OP")
    A = _spd(n, dtype, seed=n)
    B = torch.randn(n, k, dtype=dtype, generator=torch.Generator().manual_seed(k))
    A_d, B_d = A.cuda(), B.cuda()
    A_keep, B_keep = A_d.clone(), B_d.clone()
    X, info = ops.spd_solve(A_d, B_d)
    assert info.device.type == "cuda" and info.tolist() == [0, 0, 0]
    assert torch.equal(A_d, A_keep) and torch.equal(B_d, B_keep), "inputs modified"
    ref = torch.linalg.solve(A.double(), B.double())
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    assert float((X.cpu().double() - ref).abs().max() / ref.abs().max()) < tol


def test_spd_solve_cuda_reports_failures():
    _need("HAS_SPD_SOLVE_OP")
    A = torch.eye(6, dtype=torch.float64, device="cuda")
    A[2, 2] = -1.0  # indefinite: leading minor 3
    _, info = ops.spd_solve(A, torch.ones(6, 2, dtype=torch.float64, device="cuda"))
    assert info.tolist()[0] == 3
    A = torch.eye(4, device="cuda")
    A[1, 1] = float("nan")
    _, info = ops.spd_solve(A, torch.ones(4, 1, device="cuda"))
    i = info.tolist()
    assert i[0] != 0 or i[1] == 1, f"NaN input must be reported, got info {i}"


def test_robust_spd_solve_cuda_ridge_escalation():
    # Singular PSD (rank 1): plain Cholesky fails, a ridge must rescue it, on the CUDA path.
    v = torch.arange(1.0, 9.0, dtype=torch.float64, device="cuda")
    A = torch.outer(v, v)
    B = A @ torch.ones(8, 2, dtype=torch.float64, device="cuda")
    X, report = robust_spd_solve(A, B)
    assert report.method in ("cholesky+repair", "cholesky+ridge", "lstsq") and report.attempts > 1
    assert X.device.type == "cuda" and torch.isfinite(X).all()
    assert float((A @ X - B).abs().max() / B.abs().max()) < 1e-3
    # A well-conditioned system takes the plain path.
    A = _spd(64, torch.float32).cuda()
    B = torch.randn(64, 5, device="cuda")
    X, report = robust_spd_solve(A, B)
    assert report.method == "cholesky" and report.attempts == 1


def test_build_info_reports_cuda_kernels():
    info = __import__("regmean_fast").build_info()
    assert info["cuda_kernels"], info
    if os.environ.get("REGMEAN_FAST_EXPECT_NEW_CUDA_OPS", "1") == "1":
        assert info.get("cuda_reduce") and info.get("spd_solve_op") and info.get("cuda_gram_wmma"), info


# -- exact bf16x3 products (cublasGemmEx) --------------------------------------------------------
def test_split_bf16x3_cuda_equals_cpu_bitwise():
    _need("HAS_CUDA_BF16X3")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1000, 37, generator=g) * torch.exp(torch.randn(1000, 37, generator=g) * 8)
    x[0, :4] = torch.tensor([0.0, -0.0, float("inf"), -float("inf")])
    got = ops.split_bf16x3(x.cuda()).cpu()
    assert got.dtype == torch.bfloat16 and got.shape == (3, 1000, 37)
    assert torch.equal(got.view(torch.int16), ops.split_bf16x3(x).view(torch.int16))
    fin = x.isfinite()
    assert torch.equal((got[0].double() + got[1].double() + got[2].double())[fin], x.double()[fin])


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (70, 130, 33), (257, 1000, 130), (1000, 257, 17)])
def test_addmm_bf16x3_cuda_vs_fp64(transposed, m, k, n):
    _need("HAS_CUDA_BF16X3")
    g = torch.Generator().manual_seed(m * 7 + k + n)
    W = torch.randn(m, k, generator=g).bfloat16()
    B = torch.randn(k, n, generator=g) * torch.exp(torch.randn(k, n, generator=g))
    C0 = torch.randn(m, n, generator=g)
    Wd = W.cuda()
    if transposed:
        Wd = Wd.T.contiguous().T  # column-major, as a Conv1D weight's transpose: used in place
    C = C0.cuda()
    ops.addmm_bf16x3_(C, Wd, ops.split_bf16x3(B.cuda()), 0.75)
    expect = C0.double() + 0.75 * W.double() @ B.double()
    # fp32-accurate: within a few fp32 roundings of each product's magnitude (the fp32 GEMM's own bound).
    scale = (W.double().abs() @ B.double().abs()).max() + C0.abs().max()
    err = float((C.cpu().double() - expect).abs().max() / scale)
    assert err <= 8 * k**0.5 * 2.0**-24, err


def test_addmm_bf16x3_cuda_rows_of_a_bigger_matrix():
    _need("HAS_CUDA_BF16X3")
    # Rows of a larger C (the merge writes each module's rows of the concatenated right-hand side).
    g = torch.Generator().manual_seed(5)
    big = torch.full((50, 40), float("nan"))
    big[10:30] = 0.0
    W = torch.randn(20, 64, generator=g).bfloat16()
    B = torch.randn(64, 40, generator=g)
    big_d = big.cuda()
    ops.addmm_bf16x3_(big_d[10:30], W.cuda(), ops.split_bf16x3(B.cuda()), 1.0)
    out = big_d.cpu()
    assert out[:10].isnan().all() and out[30:].isnan().all()  # nothing written outside the view
    torch.testing.assert_close(out[10:30].double(), W.double() @ B.double(), rtol=1e-6, atol=1e-5)


def test_bf16x3_cuda_ops_pass_opcheck():
    _need("HAS_CUDA_BF16X3")
    x = torch.randn(6, 5, device="cuda")
    torch.library.opcheck(torch.ops.regmean_fast.split_bf16x3.default, (x,))
    torch.library.opcheck(torch.ops.regmean_fast.addmm_bf16x3_.default,
                          (torch.zeros(4, 5, device="cuda"), torch.randn(4, 6, device="cuda").bfloat16(),
                           ops.split_bf16x3(x), 0.5))
