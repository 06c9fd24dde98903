"""The registered ops against fp64 computations: every CPU path, odd sizes, masks, strides, errors."""

from __future__ import annotations

import pytest
import torch

import regmean_fast as rf
from regmean_fast import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Every CPU path REGMEAN_FAST_CPU_PATH can name; those this machine cannot run are skipped.
CPU_PATHS = ["auto", "portable", "blas-sgemm", "mkl-bf16", "avx512bf16", "avx512"]
BF16_ONLY_PATHS = ("mkl-bf16", "avx512bf16")  # forced, they leave fp32/fp16 to the automatic choice
NO_BF16_PATHS = ("avx512",)  # and this one leaves bf16


def cpu_paths_here() -> list[str]:
    info = rf.build_info()
    return ["auto"] + [p for p in info.get("cpu_paths", "portable").split(", ") if p]


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return out


@pytest.fixture(params=CPU_PATHS)
def cpu_path(request, monkeypatch):
    monkeypatch.delenv("REGMEAN_FAST_CPU_GEMM", raising=False)
    monkeypatch.delenv("REGMEAN_FAST_CPU_PATH", raising=False)
    if request.param != "auto":
        if request.param not in cpu_paths_here():
            pytest.skip(f"the {request.param} CPU path cannot run here")
        monkeypatch.setenv("REGMEAN_FAST_CPU_PATH", request.param)
    return request.param


def expected_update(G0: torch.Tensor, X: torch.Tensor, mask) -> torch.Tensor:
    """fp64: G0 with triu(R^T R) added, R the kept rows of X as given (already rounded) values."""
    rows = X.double().reshape(-1, X.size(-1))
    if mask is not None:
        rows = rows[mask.expand(X.shape[:-1]).reshape(-1)]
    return G0.double() + torch.triu(rows.T @ rows)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3, 7, 33, 130, 257])
@pytest.mark.parametrize("mask_kind", ["none", "all", "empty", "mixed"])
def test_gram_update_matches_fp64(cpu_path, device, dtype, d, mask_kind):
    g = torch.Generator().manual_seed(d * 31 + len(mask_kind))
    X = torch.randn(3, 41, d, generator=g).to(dtype).to(device)
    mask = {
        "none": None,
        "all": torch.ones(3, 41, dtype=torch.bool),
        "empty": torch.zeros(3, 41, dtype=torch.bool),
        "mixed": torch.rand(3, 41, generator=g) > 0.4,
    }[mask_kind]
    if mask is not None:
        mask = mask.to(device)
    # The strict lower triangle is poisoned: the op must leave it untouched.
    G0 = torch.triu(torch.randn(d, d, generator=g)) + torch.tril(torch.full((d, d), 7.5), -1)
    G = G0.clone().to(device)
    out = ops.gram_update(G, X, mask)
    assert out is G
    expect = expected_update(G0, X.cpu(), None if mask is None else mask.cpu())
    assert rel_err(G.cpu(), expect) < 1e-5
    assert torch.equal(torch.tril(G.cpu(), -1), torch.tril(G0, -1))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_update_noncontiguous_and_offset_views(cpu_path, device, dtype):
    g = torch.Generator().manual_seed(5)
    d = 65
    base = torch.randn(4, 50, 2 * d + 3, generator=g).to(dtype).to(device)
    X = base[1:, ::2, 3 : 3 + 2 * d : 2]  # offset, strided rows and strided columns
    assert not X.is_contiguous()
    mask = (torch.arange(25) % 3 != 0).to(device)  # broadcast over the batch dimension
    G = torch.zeros(d, d, device=device)
    ops.gram_update(G, X, mask)
    expect = expected_update(torch.zeros(d, d), X.cpu(), mask.cpu())
    assert rel_err(G.cpu(), expect) < 1e-5


def test_gram_update_bf16_large_rows_accuracy(cpu_path):
    """fp32 accumulation of bf16 products: relative error within 1e-5 of fp64 over many rows."""
    g = torch.Generator().manual_seed(11)
    X = torch.randn(4096, 96, generator=g).bfloat16()
    G = torch.zeros(96, 96)
    ops.gram_update(G, X)
    assert rel_err(G, expected_update(torch.zeros(96, 96), X, None)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 511, 513, 1025])
def test_gram_update_row_counts(cpu_path, dtype, rows):
    """Odd and even row counts around the kernels' row chunks (512 rows; row pairs for avx512bf16), with
    a mask that drops padding rows at the end and in the middle."""
    g = torch.Generator().manual_seed(rows)
    X = torch.randn(rows + 4, 97, generator=g).to(dtype)
    mask = torch.ones(rows + 4, dtype=torch.bool)
    mask[-3:] = False
    mask[rows // 2] = False
    G = torch.zeros(97, 97)
    ops.gram_update(G, X, mask)
    assert rel_err(G, expected_update(torch.zeros(97, 97), X, mask)) < 1e-5


@pytest.fixture
def no_forced_path(monkeypatch):
    if not rf.build_info()["extension"]:
        pytest.skip("pure-PyTorch build")
    monkeypatch.delenv("REGMEAN_FAST_CPU_GEMM", raising=False)
    monkeypatch.delenv("REGMEAN_FAST_CPU_PATH", raising=False)
    return monkeypatch


def test_paths_are_the_ones_reported(no_forced_path):
    monkeypatch = no_forced_path
    info = rf.build_info()
    auto = info["cpu_gemm_path"]
    features = info["cpu_features"].split()
    if "amx_bf16" in features and "bf16" in info["cpu_blas"]:
        assert auto["bfloat16"] == "mkl-bf16"
    elif "avx512_bf16" in features:
        assert auto["bfloat16"] == "avx512bf16"
    else:
        assert auto["bfloat16"] in ("blas-sgemm", "portable")
    if "avx512" in features and "amx_bf16" not in features:
        assert auto["float32"] == auto["float16"] == "avx512"
    else:
        assert auto["float32"] == auto["float16"] == ("blas-sgemm" if "f32" in info["cpu_blas"] else "portable")
    for path in cpu_paths_here()[1:]:
        monkeypatch.setenv("REGMEAN_FAST_CPU_PATH", path)
        forced = rf.build_info()["cpu_gemm_path"]
        assert forced["bfloat16"] == (auto["bfloat16"] if path in NO_BF16_PATHS else path)
        assert forced["float32"] == forced["float16"] == (auto["float32"] if path in BF16_ONLY_PATHS else path)
    monkeypatch.delenv("REGMEAN_FAST_CPU_PATH")
    monkeypatch.setenv("REGMEAN_FAST_CPU_GEMM", "portable")  # the older name still works
    assert set(rf.build_info()["cpu_gemm_path"].values()) == {"portable"}


@pytest.mark.parametrize("name, words", [("amx-bf16", "not a CPU path"), ("AVX512BF16", "not a CPU path")])
def test_forcing_an_unknown_path_is_one_line(no_forced_path, name, words):
    no_forced_path.setenv("REGMEAN_FAST_CPU_PATH", name)
    with pytest.raises(ValueError, match=words) as e:
        ops.gram_update(torch.zeros(4, 4), torch.randn(3, 4).bfloat16())
    message = str(e.value).splitlines()[0]
    assert f"REGMEAN_FAST_CPU_PATH={name}" in message and "available here: auto, " in message
    assert "cpu_path_error" in rf.build_info() and not rf.build_info()["cpu_gemm_path"]


def test_forcing_a_path_this_cpu_lacks_is_one_line(no_forced_path):
    missing = [p for p in CPU_PATHS[1:] if p not in cpu_paths_here()]
    if not missing:
        pytest.skip("this machine can run every CPU path")
    no_forced_path.setenv("REGMEAN_FAST_CPU_PATH", missing[0])
    with pytest.raises(ValueError, match=f"REGMEAN_FAST_CPU_PATH={missing[0]}: .*available here: auto, "):
        ops.gram_update(torch.zeros(4, 4), torch.randn(3, 4).bfloat16())


def test_cli_refuses_a_bad_path_in_one_line(no_forced_path, capsys):
    from regmean_fast.cli import main

    no_forced_path.setenv("REGMEAN_FAST_CPU_PATH", "fastest")
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regmean_fast: error: REGMEAN_FAST_CPU_PATH=fastest: not a CPU path")
    assert err.count("\n") == 1


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("d", [1, 2, 63, 64, 65, 130])
def test_symmetrize(device, d):
    G = torch.randn(d, d, generator=torch.Generator().manual_seed(d))
    expect = torch.triu(G) + torch.triu(G, 1).T
    Gd = G.to(device)
    assert ops.symmetrize_(Gd) is Gd
    assert torch.equal(Gd.cpu(), expect)


def test_gram_then_symmetrize_is_full_gram():
    X = torch.randn(100, 33, dtype=torch.float32)
    G = torch.zeros(33, 33)
    ops.symmetrize_(ops.gram_update(G, X))
    torch.testing.assert_close(G.double(), X.double().T @ X.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "make, err, words",
    [
        (lambda: (torch.zeros(4, 4, dtype=torch.float64), torch.zeros(2, 4), None), TypeError, "G must be float32"),
        (lambda: (torch.zeros(4, 5), torch.zeros(2, 4), None), ValueError, "square"),
        (lambda: (torch.zeros(8, 8)[::2, ::2], torch.zeros(2, 4), None), ValueError, "contiguous"),
        (lambda: (torch.zeros(4, 4), torch.zeros(2, 4, dtype=torch.int32), None), TypeError, "X must be float32"),
        (lambda: (torch.zeros(4, 4), torch.zeros(2, 5), None), ValueError, "last dimension"),
        (lambda: (torch.zeros(4, 4), torch.zeros(2, 3, 4), torch.ones(2, 3)), TypeError, "mask must be bool"),
        (lambda: (torch.zeros(4, 4), torch.zeros(2, 3, 4), torch.ones(3, 2, dtype=torch.bool)), ValueError, "broadcast"),
    ],
)
def test_gram_update_rejects_bad_arguments(make, err, words):
    G, X, mask = make()
    with pytest.raises(err, match=words):
        ops.gram_update(G, X, mask)


def test_symmetrize_rejects_bad_arguments():
    with pytest.raises(TypeError, match="float32"):
        ops.symmetrize_(torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        ops.symmetrize_(torch.zeros(3, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_gram_update_rejects_mixed_devices():
    with pytest.raises(ValueError, match="same device"):
        ops.gram_update(torch.zeros(4, 4, device="cuda"), torch.zeros(2, 4))


def test_ops_are_registered_and_pass_opcheck(cpu_path):
    G = torch.zeros(9, 9)
    X = torch.randn(2, 5, 9).bfloat16()
    mask = torch.rand(2, 5) > 0.5
    torch.library.opcheck(torch.ops.regmean_fast.gram_update.default, (G, X, mask))
    torch.library.opcheck(torch.ops.regmean_fast.gram_update.default, (G, X.float(), None))
    torch.library.opcheck(torch.ops.regmean_fast.symmetrize_.default, (torch.randn(9, 9),))


def test_ops_work_under_torch_compile():
    def step(G, X, mask):
        torch.ops.regmean_fast.gram_update(G, X, mask)
        return G

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    X = torch.randn(2, 6, 10)
    mask = torch.rand(2, 6) > 0.3
    G = torch.zeros(10, 10)
    compiled(G, X, mask)
    assert rel_err(G, expected_update(torch.zeros(10, 10), X, mask)) < 1e-5


def test_fake_tensor_shapes_are_checked():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        G = torch.empty(5, 5)
        X = torch.empty(3, 6)
        with pytest.raises(ValueError, match="last dimension"):
            torch.ops.regmean_fast.gram_update(G, X, None)


def reduce_fp64(grams, factors, alpha):
    """The definition, in fp64, from the upper triangles (the lower ones of the inputs are noise)."""
    out = 0
    for G, f in zip(grams, factors):
        U = torch.triu(G.double())
        S = U + torch.triu(U, 1).T
        out = out + f * (alpha * S + (1 - alpha) * torch.diag(torch.diagonal(S)))
    return out


@pytest.mark.parametrize("d", [1, 7, 129])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_reduce_matches_definition(d, k, alpha, packed, dtype):
    g = torch.Generator().manual_seed(d * 7 + k)
    grams = [torch.randn(d, d, generator=g) for _ in range(k)]
    factors = [0.5 + i for i in range(k)]
    inputs = [ops.pack_triu(G) for G in grams] if packed else grams
    A = ops.gram_reduce(inputs, factors, alpha, dtype)
    assert A.dtype == dtype and A.shape == (d, d)
    assert torch.equal(A, A.T)
    expect = reduce_fp64(grams, factors, alpha)
    assert rel_err(A, expect) < (1e-6 if dtype == torch.float32 else 1e-14)
    baseline = ops.torch_gram_reduce([G + G.T - torch.diag(torch.diagonal(G)) for G in [torch.triu(G) for G in grams]], factors, alpha, dtype)
    assert rel_err(baseline, expect) < (1e-6 if dtype == torch.float32 else 1e-14)


@pytest.mark.parametrize("d", [1, 2, 64, 65])
def test_pack_unpack_round_trip(d):
    G = torch.randn(d, d, generator=torch.Generator().manual_seed(d))
    P = ops.pack_triu(G)
    rows, cols = torch.triu_indices(d, d)
    assert torch.equal(P, G[rows, cols])
    assert torch.equal(ops.unpack_triu(P), torch.triu(G) + torch.triu(G, 1).T)
    assert torch.equal(ops.torch_unpack_triu(P), ops.unpack_triu(P))
    assert torch.equal(ops.torch_pack_triu(G), P)


def test_gram_reduce_rejects_bad_arguments():
    G = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="factors"):
        ops.gram_reduce([G, G], [1.0], 0.5)
    with pytest.raises(ValueError, match="alpha"):
        ops.gram_reduce([G], [1.0], 1.5)
    with pytest.raises(ValueError, match="one shape"):
        ops.gram_reduce([G, torch.zeros(5, 5)], [1.0, 1.0], 0.5)
    with pytest.raises(TypeError, match="float32"):
        ops.gram_reduce([G.double()], [1.0], 0.5)
    with pytest.raises(ValueError, match="packed triangle"):
        ops.unpack_triu(torch.zeros(5))


def test_reduce_ops_pass_opcheck():
    grams = [torch.randn(6, 6), torch.randn(6, 6)]
    torch.library.opcheck(torch.ops.regmean_fast.gram_reduce.default, (grams, [0.3, 0.7], 0.5, None))
    torch.library.opcheck(torch.ops.regmean_fast.pack_triu.default, (grams[0],))
    torch.library.opcheck(torch.ops.regmean_fast.unpack_triu.default, (torch.randn(21),))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("n", [1, 4097, 20000, 200001])  # the last one spans several 64K-element chunks
def test_all_finite_matches_torch(dtype, bad, n):
    t = torch.randn(n).to(dtype)
    if bad is not None:
        t[(n * 7) // 11] = bad
    assert ops.all_finite(t) == bool(torch.isfinite(t).all())
    assert ops.all_finite(t[::2]) == bool(torch.isfinite(t[::2]).all())  # strided views too


@pytest.mark.parametrize("d", [1, 5, 64, 130])
def test_symmetry_stats_matches_definition(d):
    g = torch.Generator().manual_seed(d)
    G = torch.randn(d, d, generator=g)
    G = G + G.T
    G[0, d - 1] += 0.25  # one asymmetric pair (the diagonal itself when d == 1)
    finite, max_abs, max_asym, min_diag = ops.symmetry_stats(G)
    assert finite
    assert max_abs == float(G.abs().max())
    assert max_asym == pytest.approx(float((G - G.T).abs().max()), abs=1e-6)
    assert min_diag == float(G.diagonal().min())
    G[d // 2, d // 3] = float("nan")
    assert not ops.symmetry_stats(G)[0]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_reduce_large_odd_size(packed, dtype):
    """d = 1000 (not a multiple of any tile), K = 5: the fused op against the fp64 definition."""
    g = torch.Generator().manual_seed(1000)
    grams = [torch.randn(1000, 1000, generator=g) for _ in range(5)]
    factors = [0.1, 0.2, 0.3, 0.15, 0.25]
    inputs = [ops.pack_triu(G) for G in grams] if packed else grams
    A = ops.gram_reduce(inputs, factors, 0.7, dtype)
    assert rel_err(A, reduce_fp64(grams, factors, 0.7)) < (1e-6 if dtype == torch.float32 else 1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_update_d1000_both_paths(cpu_path, dtype):
    X = torch.randn(300, 1000, generator=torch.Generator().manual_seed(3)).to(dtype)
    G = torch.zeros(1000, 1000)
    ops.gram_update(G, X)
    assert rel_err(G, expected_update(torch.zeros(1000, 1000), X, None)) < 1e-5


def test_info_measures_each_dtypes_path(capsys):
    """`info` times gram_update's path per dtype beside torch's own X^T X (positive rates), and --no-measure
    skips it."""
    import json

    from regmean_fast.cli import main

    if not rf.build_info()["extension"]:
        pytest.skip("no extension")
    assert main(["info", "--json"]) == 0
    rates = json.loads(capsys.readouterr().out)["measured_gflops"]
    assert set(rates) == {"float32", "bfloat16", "float16"}
    assert all(r["gram_update"] > 0 and r["torch_full"] > 0 for r in rates.values())
    assert main(["info", "--json", "--no-measure"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "measured_gflops" not in info
    avx512 = "avx512" in info["cpu_features"].split()
    assert info["dare_drop_path"] == ("avx512" if avx512 else "portable")  # (x86-64 GCC >= 10 builds have it)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP/s here" in out and f"DARE draws (dare_*)    : {info['dare_drop_path']}" in out
