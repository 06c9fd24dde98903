"""The merge's fused ops against fp64 definitions: gram_term (a raw Gram's symmetry stats, triu(A) += triu(S)
and S or its bf16x3 slices) and spd_solve_ (Cholesky solve in place), each through the registered operator
and through its pure-PyTorch twin (the no-extension and non-CPU path)."""

from __future__ import annotations

import pytest
import torch

from regmean_fast import ops

IMPLS = ["op", "torch"]


def gram_term(impl, G, factor, alpha, A=None, S=None):
    if impl == "op":
        return ops.gram_term(G, factor, alpha, A, S)
    finite, max_abs, max_asym, min_diag = ops.torch_gram_term(G, factor, alpha, A, S).tolist()
    return bool(finite), max_abs, max_asym, min_diag


def spd_solve_(impl, A, Bt, factored=False):
    return (ops.spd_solve_ if impl == "op" else ops.torch_spd_solve_)(A, Bt, factored)


def term_fp64(G: torch.Tensor, factor: float, alpha: float) -> torch.Tensor:
    """factor (alpha G + (1 - alpha) diag G), elementwise from G as given, in fp64."""
    G = G.double()
    return factor * (alpha * G + (1 - alpha) * torch.diag(torch.diagonal(G)))


def stats_fp64(G: torch.Tensor):
    """(finite, max |G|, max |G - G^T|, min diag) over the pairs whose members are both finite."""
    G = G.double()
    ok = torch.isfinite(G) & torch.isfinite(G.T)
    Gf = torch.where(ok, G, torch.zeros_like(G))
    diag = torch.diagonal(G)[torch.isfinite(torch.diagonal(G))]
    return (bool(torch.isfinite(G).all()), float(Gf.abs().max()), float((Gf - Gf.T).abs().max()),
            float(diag.min()))


def random_gram(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d + 3, d, generator=g)
    G = X.T @ X
    G[0, d - 1] += 0.125  # one asymmetric pair (on the diagonal when d == 1)
    return G


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.0])
@pytest.mark.parametrize("d", [1, 7, 64, 65, 200])
def test_gram_term_matches_definition(impl, alpha, d):
    G = random_gram(d, d)
    factor = 0.37
    A0 = torch.randn(d, d, generator=torch.Generator().manual_seed(1))
    A, S = A0.clone(), torch.full((d, d), float("nan"))
    Ss = torch.zeros(3, d, d, dtype=torch.bfloat16)
    stats = gram_term(impl, G, factor, alpha, A, S)
    assert gram_term(impl, G, factor, alpha, None, Ss) == stats
    finite, max_abs, max_asym, min_diag = stats_fp64(G)
    assert stats[0] is finite and stats[1] == max_abs and stats[3] == min_diag
    assert stats[2] == pytest.approx(max_asym, rel=1e-6)
    T = term_fp64(G, factor, alpha)
    scale = float(T.abs().max())
    assert float((S.double() - T).abs().max()) <= 2 * 2**-24 * scale  # two roundings: the factor, the product
    # A: the upper triangle (diagonal included) gets S's, the strict lower one is left as it was
    expect = A0.double() + torch.triu(T)
    assert float((A.double() - expect).abs().max()) <= 4 * 2**-24 * (scale + float(A0.abs().max()))
    assert torch.equal(torch.tril(A, diagonal=-1), torch.tril(A0, diagonal=-1))
    assert torch.equal(Ss[0].float() + Ss[1].float() + Ss[2].float(), S)  # the slices sum to S exactly


@pytest.mark.parametrize("impl", IMPLS)
def test_gram_term_outputs_are_optional_and_stats_alone_match_symmetry_stats(impl):
    G = random_gram(70, 3)
    assert gram_term(impl, G, 0.5, 0.9) == pytest.approx(ops.symmetry_stats(G))
    A = torch.zeros(70, 70)
    gram_term(impl, G, 0.5, 0.9, A)
    torch.testing.assert_close(A.double(), torch.triu(term_fp64(G, 0.5, 0.9)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", ["upper", "lower", "diag"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_gram_term_sees_non_finite_anywhere(impl, where, bad):
    G = random_gram(130, 5)
    i, j = {"upper": (3, 100), "lower": (100, 3), "diag": (77, 77)}[where]
    G[i, j] = bad
    stats = gram_term(impl, G, 1.0, 0.5, torch.zeros(130, 130))
    assert stats[0] is False
    assert all(v == v for v in stats[1:])  # the other numbers describe the finite pairs


def test_gram_term_rejects_bad_arguments():
    G = torch.randn(5, 5)
    for args, err, words in (((G.double(), 1.0, 1.0), TypeError, "G must be float32"),
                             ((torch.randn(5, 4), 1.0, 1.0), ValueError, "square"),
                             ((torch.randn(5, 10)[:, ::2], 1.0, 1.0), ValueError, "contiguous"),
                             ((G, 1.0, 1.0, torch.zeros(4, 4)), ValueError, "A must be a contiguous [5, 5]"),
                             ((G, 1.0, 1.0, None, torch.zeros(3, 5, 5)), ValueError, "S must be float32 [5, 5]")):
        with pytest.raises(err, match=words.replace("[", r"\[").replace("]", r"\]")):
            ops.gram_term(*args)
        with pytest.raises(err, match=words.replace("[", r"\[").replace("]", r"\]")):
            ops.torch_gram_term(*args)


def solve_case(d: int, n: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = X @ X.T + d * torch.eye(d, dtype=torch.float64)
    Bt = torch.randn(n, d, generator=g, dtype=torch.float64)
    return A, Bt, torch.linalg.solve(A, Bt.T).T


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,n", [(1, 1), (5, 3), (130, 7), (300, 301), (4, 0)])
def test_spd_solve_inplace_matches_fp64(impl, dtype, d, n):
    A64, Bt64, X = solve_case(d, n, dtype, seed=d + n)
    A, Bt = A64.to(dtype, copy=True), Bt64.to(dtype, copy=True)
    lower = torch.tril(A, diagonal=-1).clone()
    info = spd_solve_(impl, A, Bt)
    assert info.dtype == torch.int32 and info.tolist() == [0, 0, 0]
    if n:
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert float((Bt.double() - X).abs().max() / X.abs().max()) < tol
    U = torch.triu(A.double())  # the factor in the upper triangle, the rest untouched
    assert float((U.T @ U - A64).abs().max() / A64.abs().max()) < (1e-6 if dtype == torch.float32 else 1e-14)
    assert torch.equal(torch.tril(A, diagonal=-1), lower)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spd_solve_inplace_factored_solves_more_right_hand_sides(impl, dtype):
    A64, Bt64, X = solve_case(90, 5, dtype, seed=4)
    _, Ct64, _ = solve_case(90, 7, dtype, seed=5)
    A = A64.to(dtype, copy=True)
    assert spd_solve_(impl, A, torch.empty(0, 90, dtype=dtype)).tolist() == [0, 0, 0]  # factor only
    U = A.clone()
    for B64 in (Bt64, Ct64):
        Bt = B64.to(dtype, copy=True)
        assert spd_solve_(impl, A, Bt, True).tolist() == [0, 0, 0]
        ref = torch.linalg.solve(A64, B64.T).T
        assert float((Bt.double() - ref).abs().max() / ref.abs().max()) < (1e-5 if dtype == torch.float32 else 1e-12)
    assert torch.equal(A, U)  # the factor is only read


@pytest.mark.parametrize("impl", IMPLS)
def test_spd_solve_inplace_failure_leaves_inputs(impl):
    A64, Bt64, _ = solve_case(50, 4, torch.float64)
    A64[20, 20] = -1.0  # not positive definite from the 21st leading minor on
    A, Bt = A64.float(), Bt64.float()
    A0, B0 = A.clone(), Bt.clone()
    info = spd_solve_(impl, A, Bt).tolist()
    assert info[0] > 0
    assert torch.equal(A, A0) and torch.equal(Bt, B0)


def test_spd_solve_inplace_rejects_bad_arguments():
    A = torch.eye(4)
    for args, err, words in (((A.half(), torch.zeros(2, 4).half()), TypeError, "float32 or float64"),
                             ((A, torch.zeros(2, 4).double()), TypeError, "one dtype"),
                             ((A, torch.zeros(4, 2)), ValueError, "Bt must be"),
                             ((A, torch.zeros(4, 4).T[:2]), ValueError, "contiguous")):
        with pytest.raises(err, match=words):
            ops.spd_solve_(*args)
        with pytest.raises(err, match=words):
            ops.torch_spd_solve_(*args)


def test_merge_ops_pass_opcheck():
    G = random_gram(6, 1)
    torch.library.opcheck(torch.ops.regmean_fast.gram_term.default, (G, 0.5, 0.9, torch.zeros(6, 6), torch.zeros(6, 6)))
    torch.library.opcheck(torch.ops.regmean_fast.gram_term.default,
                          (G, 0.5, 0.9, None, torch.zeros(3, 6, 6, dtype=torch.bfloat16)))
    A, Bt, _ = solve_case(6, 2, torch.float32)
    torch.library.opcheck(torch.ops.regmean_fast.spd_solve_.default, (A.float(), Bt.float()))
    torch.library.opcheck(torch.ops.regmean_fast.spd_solve_.default, (A.float(), Bt.float(), True))
