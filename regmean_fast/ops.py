"""The fast ops' Python face.

Each op is a registered PyTorch operator, reachable as ``torch.ops.regmean_fast.<name>`` (so other
libraries can call it and torch.compile can trace it: fake implementations are registered here) and
as a plain function in this module. The compiled extension provides CPU and CUDA kernels; without
it the same operators are registered from the pure-PyTorch reference.
"""

from __future__ import annotations

import torch

from . import _ext, reference

GRAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_SCHEMAS = {
    "gram_update": "gram_update(Tensor(a!) G, Tensor X, Tensor? mask=None) -> ()",
    "symmetrize_": "symmetrize_(Tensor(a!) G) -> ()",
    "gram_reduce": "gram_reduce(Tensor[] grams, float[] factors, float alpha, ScalarType? dtype=None) -> Tensor",
    "pack_triu": "pack_triu(Tensor G) -> Tensor",
    "unpack_triu": "unpack_triu(Tensor packed) -> Tensor",
    "spd_solve": "spd_solve(Tensor A, Tensor B) -> (Tensor, Tensor)",
    "split_bf16x3": "split_bf16x3(Tensor x) -> Tensor",
    "addmm_bf16x3_": "addmm_bf16x3_(Tensor(a!) C, Tensor A, Tensor Bs, float alpha) -> ()",
    "gram_term": "gram_term(Tensor G, float factor, float alpha, Tensor(a!)? A=None, Tensor(b!)? S=None) -> Tensor",
    "spd_solve_": "spd_solve_(Tensor(a!) A, Tensor(b!) Bt, bool factored=False) -> Tensor",
}


def check_gram_update_args(G: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None) -> None:
    """The argument contract of gram_update (the C++ op checks the same, with the same words)."""
    if G.dtype != torch.float32:
        raise TypeError(f"gram_update: G must be float32, got {G.dtype}")
    if G.dim() != 2 or G.size(0) != G.size(1):
        raise ValueError(f"gram_update: G must be a square matrix, got shape {tuple(G.shape)}")
    if not G.is_contiguous():
        raise ValueError("gram_update: G must be contiguous")
    if X.dtype not in GRAM_DTYPES:
        raise TypeError(f"gram_update: X must be float32, bfloat16 or float16, got {X.dtype}")
    if X.dim() < 1 or X.size(-1) != G.size(0):
        raise ValueError(
            f"gram_update: X's last dimension must equal G's size {G.size(0)}, got shape {tuple(X.shape)}"
        )
    if X.device != G.device:
        raise ValueError(f"gram_update: G and X must be on the same device, got {G.device} and {X.device}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"gram_update: mask must be bool, got {mask.dtype}")
        if mask.device != X.device:
            raise ValueError(f"gram_update: mask must be on X's device {X.device}, got {mask.device}")
        try:
            torch.broadcast_shapes(mask.shape, X.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"gram_update: mask of shape {tuple(mask.shape)} does not broadcast to X's rows "
                f"{tuple(X.shape[:-1])}"
            ) from None


def check_symmetrize_args(G: torch.Tensor) -> None:
    if G.dtype != torch.float32:
        raise TypeError(f"symmetrize_: G must be float32, got {G.dtype}")
    if G.dim() != 2 or G.size(0) != G.size(1):
        raise ValueError(f"symmetrize_: G must be a square matrix, got shape {tuple(G.shape)}")
    if not G.is_contiguous():
        raise ValueError("symmetrize_: G must be contiguous")


def packed_order(n: int) -> int:
    """d such that d (d + 1) / 2 == n, or ValueError."""
    d = int(((8 * n + 1) ** 0.5 - 1) / 2)
    while d * (d + 1) // 2 < n:
        d += 1
    while d > 0 and d * (d + 1) // 2 > n:
        d -= 1
    if d * (d + 1) // 2 != n:
        raise ValueError(f"{n} is not the size of a packed triangle")
    return d


def gram_order(g: torch.Tensor, op: str) -> int:
    """Order of a full [d, d] or packed [d (d + 1) / 2] Gram."""
    if g.dim() == 2:
        if g.size(0) != g.size(1):
            raise ValueError(f"{op}: a full Gram must be square, got shape {tuple(g.shape)}")
        return g.size(0)
    if g.dim() != 1:
        raise ValueError(f"{op}: a Gram must be [d, d] or a packed [d (d + 1) / 2] triangle, got shape {tuple(g.shape)}")
    return packed_order(g.size(0))


def check_gram_reduce_args(grams, factors, alpha, dtype) -> int:
    if len(grams) == 0:
        raise ValueError("gram_reduce: no Grams given")
    if len(factors) != len(grams):
        raise ValueError(f"gram_reduce: {len(factors)} factors for {len(grams)} Grams")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"gram_reduce: alpha must be in [0, 1], got {alpha}")
    if dtype not in (None, torch.float32, torch.float64):
        raise TypeError(f"gram_reduce: dtype must be float32 or float64, got {dtype}")
    for g in grams:
        if g.dtype != torch.float32:
            raise TypeError(f"gram_reduce: Grams must be float32, got {g.dtype}")
        if g.shape != grams[0].shape:
            raise ValueError(f"gram_reduce: all Grams must have one shape, got {tuple(g.shape)} and {tuple(grams[0].shape)}")
    return gram_order(grams[0], "gram_reduce")


def reduce_expression(grams, factors, alpha, dtype) -> torch.Tensor:
    """sum_k f_k (alpha G_k + (1 - alpha) diag(G_k)) as the straightforward tensor expression, for
    full Grams of any float dtype (no checks: callers check)."""
    return sum(
        f * (alpha * G.to(dtype) + (1 - alpha) * torch.diag(torch.diagonal(G).to(dtype))) for G, f in zip(grams, factors)
    )


def torch_gram_reduce(grams, factors, alpha, dtype=None) -> torch.Tensor:
    """gram_reduce in pure PyTorch (the benchmark baseline and the no-extension path)."""
    check_gram_reduce_args(grams, factors, alpha, dtype)
    full = [torch_unpack_triu(g) if g.dim() == 1 else g for g in grams]
    return reduce_expression(full, factors, alpha, dtype or torch.float32)


def torch_pack_triu(G: torch.Tensor) -> torch.Tensor:
    check_symmetrize_args(G)
    rows, cols = torch.triu_indices(G.size(0), G.size(0), device=G.device)
    return G[rows, cols]


def torch_unpack_triu(packed: torch.Tensor) -> torch.Tensor:
    d = packed_order(packed.numel())
    rows, cols = torch.triu_indices(d, d, device=packed.device)
    G = packed.new_zeros(d, d)
    G[rows, cols] = packed
    G[cols, rows] = packed
    return G


def check_spd_solve_args(A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"spd_solve: A must be float32 or float64, got {A.dtype}")
    if B.dtype != A.dtype:
        raise TypeError(f"spd_solve: A and B must have one dtype, got {A.dtype} and {B.dtype}")
    if A.dim() != 2 or A.size(0) != A.size(1):
        raise ValueError(f"spd_solve: A must be a square matrix, got shape {tuple(A.shape)}")
    if B.dim() != 2 or B.size(0) != A.size(0):
        raise ValueError(f"spd_solve: B must be [{A.size(0)}, k], got shape {tuple(B.shape)}")
    if A.device != B.device:
        raise ValueError(f"spd_solve: A and B must be on one device, got {A.device} and {B.device}")


def torch_spd_solve(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """spd_solve in pure PyTorch: (X, info) with info = int32 [potrf info, factor non-finite, 0]."""
    check_spd_solve_args(A, B)
    L, info = torch.linalg.cholesky_ex(A)
    nonfinite = torch.logical_not(torch.isfinite(L).all())
    out_info = torch.stack([info.to(torch.int32), nonfinite.to(torch.int32), torch.zeros_like(info, dtype=torch.int32)])
    return torch.cholesky_solve(B, L), out_info


def torch_split_bf16x3(x: torch.Tensor) -> torch.Tensor:
    """split_bf16x3 in pure PyTorch (the no-extension path): each slice rounds what the previous left."""
    hi = x.bfloat16()
    r1 = x - hi.float()
    mid = r1.bfloat16()
    return torch.stack([hi, mid, (r1 - mid.float()).bfloat16()])


def torch_addmm_bf16x3_(C: torch.Tensor, A: torch.Tensor, Bs: torch.Tensor, alpha: float) -> None:
    """addmm_bf16x3_ in pure PyTorch (the no-extension path): one fp32 GEMM on the re-summed slices."""
    C.addmm_(A.float(), Bs[0].float() + Bs[1].float() + Bs[2].float(), alpha=alpha)


def check_gram_term_args(G: torch.Tensor, A: torch.Tensor | None, S: torch.Tensor | None) -> None:
    """The argument contract of gram_term (the C++ op checks the same, with the same words)."""
    if G.dtype != torch.float32:
        raise TypeError(f"gram_term: G must be float32, got {G.dtype}")
    if G.dim() != 2 or G.size(0) != G.size(1):
        raise ValueError(f"gram_term: G must be a square matrix, got shape {tuple(G.shape)}")
    if not G.is_contiguous():
        raise ValueError("gram_term: G must be contiguous")
    d = G.size(0)
    if A is not None:
        if A.dtype != torch.float32:
            raise TypeError(f"gram_term: A must be float32, got {A.dtype}")
        if tuple(A.shape) != (d, d) or not A.is_contiguous():
            raise ValueError(f"gram_term: A must be a contiguous [{d}, {d}] matrix, got shape {tuple(A.shape)}")
        if A.device != G.device:
            raise ValueError("gram_term: A must be on G's device")
    if S is not None:
        if not ((S.dtype == torch.float32 and tuple(S.shape) == (d, d))
                or (S.dtype == torch.bfloat16 and tuple(S.shape) == (3, d, d))):
            raise ValueError(f"gram_term: S must be float32 [{d}, {d}] or bfloat16 [3, {d}, {d}], got {S.dtype} "
                             f"{tuple(S.shape)}")
        if not S.is_contiguous():
            raise ValueError("gram_term: S must be contiguous")
        if S.device != G.device:
            raise ValueError("gram_term: S must be on G's device")


def torch_gram_term(G, factor, alpha, A=None, S=None) -> torch.Tensor:
    """gram_term in pure PyTorch (the no-extension and non-CPU path)."""
    check_gram_term_args(G, A, S)
    finite, max_abs, max_asym, min_diag = torch_symmetry_stats(G)
    if A is not None or S is not None:
        T = G * (factor * alpha)
        T.diagonal().copy_(torch.diagonal(G) * factor)
        if A is not None:
            A.add_(torch.triu(T))
        if S is not None:
            S.copy_(T if S.dtype == torch.float32 else torch_split_bf16x3(T))
    return torch.tensor([float(finite), max_abs, max_asym, min_diag], dtype=torch.float32, device=G.device)


def check_spd_solve_inplace_args(A: torch.Tensor, Bt: torch.Tensor) -> None:
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"spd_solve_: A must be float32 or float64, got {A.dtype}")
    if Bt.dtype != A.dtype:
        raise TypeError(f"spd_solve_: A and Bt must have one dtype, got {A.dtype} and {Bt.dtype}")
    if A.dim() != 2 or A.size(0) != A.size(1):
        raise ValueError(f"spd_solve_: A must be a square matrix, got shape {tuple(A.shape)}")
    if Bt.dim() != 2 or Bt.size(1) != A.size(0):
        raise ValueError(f"spd_solve_: Bt must be [k, {A.size(0)}], got shape {tuple(Bt.shape)}")
    if not (A.is_contiguous() and Bt.is_contiguous()):
        raise ValueError("spd_solve_: A and Bt must be contiguous")
    if A.device != Bt.device:
        raise ValueError(f"spd_solve_: A and Bt must be on one device, got {A.device} and {Bt.device}")


def torch_spd_solve_(A: torch.Tensor, Bt: torch.Tensor, factored: bool = False) -> torch.Tensor:
    """spd_solve_ in pure PyTorch: the contract of the compiled op through torch.linalg."""
    check_spd_solve_inplace_args(A, Bt)
    info = torch.zeros(3, dtype=torch.int32, device=A.device)
    U = torch.triu(A)
    if not factored:
        U, status = torch.linalg.cholesky_ex(A, upper=True)
        info[0] = status
        if int(status) == 0 and not bool(torch.isfinite(U).all()):
            info[1] = 1
        if int(info[0]) != 0 or int(info[1]) != 0:
            return info
        A.copy_(torch.triu(U) + torch.tril(A, diagonal=-1))
    if Bt.size(0):
        Bt.copy_(torch.cholesky_solve(Bt.T, U, upper=True).T)
    return info


# The compiled spd_solve exists only in builds that report it (an older in-place build lacks it).
HAS_SPD_SOLVE_OP = _ext.HAS_SPD_SOLVE_OP or not _ext.HAVE_EXTENSION


if not _ext.HAVE_EXTENSION:
    # Same operators, pure-PyTorch bodies: callers never need to know which one they got.
    _fallback_lib = torch.library.Library("regmean_fast", "DEF")
    for _schema in _SCHEMAS.values():
        _fallback_lib.define(_schema)

    def _gram_update_fallback(G, X, mask=None):
        check_gram_update_args(G, X, mask)
        reference.gram_update(G, X, mask)

    def _symmetrize_fallback(G):
        check_symmetrize_args(G)
        reference.symmetrize_(G)

    _fallback_lib.impl("gram_update", _gram_update_fallback, "CompositeExplicitAutograd")
    _fallback_lib.impl("gram_reduce", torch_gram_reduce, "CompositeExplicitAutograd")
    _fallback_lib.impl("pack_triu", torch_pack_triu, "CompositeExplicitAutograd")
    _fallback_lib.impl("unpack_triu", torch_unpack_triu, "CompositeExplicitAutograd")
    _fallback_lib.impl("symmetrize_", _symmetrize_fallback, "CompositeExplicitAutograd")
    _fallback_lib.impl("spd_solve", torch_spd_solve, "CompositeExplicitAutograd")
    _fallback_lib.impl("split_bf16x3", torch_split_bf16x3, "CompositeExplicitAutograd")
    _fallback_lib.impl("addmm_bf16x3_", torch_addmm_bf16x3_, "CompositeExplicitAutograd")
    _fallback_lib.impl("gram_term", torch_gram_term, "CompositeExplicitAutograd")
    _fallback_lib.impl("spd_solve_", torch_spd_solve_, "CompositeExplicitAutograd")


@torch.library.register_fake("regmean_fast::gram_update")
def _gram_update_fake(G, X, mask=None):
    check_gram_update_args(G, X, mask)


@torch.library.register_fake("regmean_fast::symmetrize_")
def _symmetrize_fake(G):
    check_symmetrize_args(G)


@torch.library.register_fake("regmean_fast::gram_reduce")
def _gram_reduce_fake(grams, factors, alpha, dtype=None):
    d = check_gram_reduce_args(grams, factors, alpha, dtype)
    return grams[0].new_empty((d, d), dtype=dtype or torch.float32)


@torch.library.register_fake("regmean_fast::pack_triu")
def _pack_triu_fake(G):
    check_symmetrize_args(G)
    d = G.size(0)
    return G.new_empty((d * (d + 1) // 2,))


if HAS_SPD_SOLVE_OP:

    @torch.library.register_fake("regmean_fast::spd_solve")
    def _spd_solve_fake(A, B):
        check_spd_solve_args(A, B)
        return B.new_empty(B.shape), A.new_empty((3,), dtype=torch.int32)


@torch.library.register_fake("regmean_fast::unpack_triu")
def _unpack_triu_fake(packed):
    d = packed_order(packed.size(0))
    return packed.new_empty((d, d))


def gram_update(G: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """In place: ``triu(G) += triu(X[mask]^T X[mask])``, accumulated in fp32.

    G: float32 [d, d], contiguous; only its upper triangle (diagonal included) is read and written,
    the strict lower triangle is left as it was (``symmetrize_`` fills it).
    X: [..., d] in bfloat16, float16 or float32, any strides, same device as G.
    mask: optional bool tensor broadcastable to ``X.shape[:-1]``; rows where it is False (padding)
    are skipped. Returns G.
    """
    torch.ops.regmean_fast.gram_update(G, X, mask)
    return G


def symmetrize_(G: torch.Tensor) -> torch.Tensor:
    """In place: copy the upper triangle of the float32 square matrix G into its lower triangle."""
    torch.ops.regmean_fast.symmetrize_(G)
    return G


def gram_reduce(grams, factors, alpha: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``A = sum_k factors[k] * (alpha G_k + (1 - alpha) diag(G_k))`` in one pass, full symmetric.

    grams: K float32 Grams, all full [d, d] (only the upper triangle is read) or all packed
    [d (d + 1) / 2] upper triangles. dtype: float32 (default) or float64 for A. The factors carry
    the model coefficients and the normalisation (c_k / n_k for "mean").
    """
    grams = list(grams)
    factors = [float(f) for f in factors]
    if grams and grams[0].device.type != "cpu" and not _ext.HAS_CUDA_REDUCE:
        return torch_gram_reduce(grams, factors, float(alpha), dtype)
    return torch.ops.regmean_fast.gram_reduce(grams, factors, float(alpha), dtype)


def pack_triu(G: torch.Tensor) -> torch.Tensor:
    """The upper triangle of the float32 square G, row-major, as a 1-D tensor of d (d + 1) / 2."""
    if G.device.type != "cpu" and not _ext.HAS_CUDA_REDUCE:
        return torch_pack_triu(G)
    return torch.ops.regmean_fast.pack_triu(G)


def unpack_triu(packed: torch.Tensor) -> torch.Tensor:
    """The full symmetric [d, d] matrix whose packed upper triangle is given."""
    if packed.device.type != "cpu" and not _ext.HAS_CUDA_REDUCE:
        return torch_unpack_triu(packed)
    return torch.ops.regmean_fast.unpack_triu(packed)


def spd_solve(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky solve of ``A X = B`` (A symmetric positive definite [n, n], B [n, k], one float
    dtype, one device), without a host synchronisation.

    Returns ``(X, info)`` with info an int32 tensor on A's device: ``[potrf info, factor
    non-finite, potrs info]``. X is meaningful only when ``info[0] == info[1] == 0``; info[0] = k > 0
    means the leading minor of order k is not positive definite. CUDA: cuSOLVER Xpotrf + Xpotrs on
    the current stream; CPU: torch's LAPACK path.
    """
    if not HAS_SPD_SOLVE_OP:
        return torch_spd_solve(A, B)
    return torch.ops.regmean_fast.spd_solve(A, B)


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of t is inf or NaN (one pass, no temporaries, on CPU float tensors)."""
    if not t.is_floating_point():
        return True
    if _ext.HAVE_EXTENSION and t.device.type == "cpu" and t.dtype in GRAM_DTYPES:
        return bool(_ext._C.all_finite(t))
    return bool(torch.isfinite(t).all())


def symmetry_stats(G: torch.Tensor) -> tuple[bool, float, float, float]:
    """(all finite, max |G|, max |G - G^T|, min diag(G)) of a square float32 matrix, in one pass.

    When not all finite, the other three numbers describe the finite elements only."""
    if _ext.HAVE_EXTENSION and G.device.type == "cpu" and G.dtype == torch.float32 and G.is_contiguous():
        check_symmetrize_args(G)
        finite, max_abs, max_asym, min_diag = _ext._C.symmetry_stats(G)
        return bool(finite), float(max_abs), float(max_asym), float(min_diag)
    return torch_symmetry_stats(G)


def torch_symmetry_stats(G: torch.Tensor) -> tuple[bool, float, float, float]:
    """symmetry_stats in tensor expressions (any device)."""
    check_symmetrize_args(G)
    finite = bool(torch.isfinite(G).all())
    if G.numel() == 0:
        return finite, 0.0, 0.0, float("inf")
    ok = torch.isfinite(G) & torch.isfinite(G.T)  # a pair with a non-finite member is left out
    Gf = torch.where(ok, G, 0.0)
    diag = torch.diagonal(G)
    diag = diag[torch.isfinite(diag)]
    return (finite, float(Gf.abs().max()), float((Gf - Gf.T).abs().max()),
            float(diag.min()) if diag.numel() else float("inf"))


def gram_term(G: torch.Tensor, factor: float, alpha: float, A: torch.Tensor | None = None,
              S: torch.Tensor | None = None) -> tuple[bool, float, float, float]:
    """One model's RegMean term from a raw Gram G (float32 [d, d], contiguous),
    ``S = factor * (alpha G + (1 - alpha) diag(G))`` elementwise, and G's symmetry_stats, without a
    temporary: the stats from one read-only pass over G's tile pairs, the outputs from one pass over its rows.

    In place, each optional: the upper triangle of ``A`` (float32 [d, d], diagonal included) += S's, its strict
    lower triangle left as it was (``symmetrize_`` it before reading it); S written into ``S`` (float32
    [d, d]) or, for a bfloat16 [3, d, d] ``S``, its bf16x3 slices (``split_bf16x3``: the operand of
    ``addmm_bf16x3_``). The outputs mean something only when the stats say G is finite, so callers check the
    stats (and raise) before using them."""
    if G.device.type != "cpu" or not _ext.HAVE_EXTENSION:
        stats = torch_gram_term(G, float(factor), float(alpha), A, S)
    else:
        stats = torch.ops.regmean_fast.gram_term(G, float(factor), float(alpha), A, S)
    finite, max_abs, max_asym, min_diag = stats.tolist()
    return bool(finite), max_abs, max_asym, min_diag


def spd_solve_(A: torch.Tensor, Bt: torch.Tensor, factored: bool = False) -> torch.Tensor:
    """In place: ``Bt <- Bt A^-1`` (the transposed solution X^T of ``A X = Bt^T``) for a symmetric positive
    definite A [d, d] (only its upper triangle is read) and Bt [k, d], contiguous, one float dtype.

    Returns int32 ``info = [potrf info, factor non-finite, potrs info]`` (as spd_solve). On success A's upper
    triangle holds the Cholesky factor U (A = U^T U); on failure A is restored from its strict lower triangle
    (so a symmetric A is unchanged) and Bt is untouched. factored=True: A already holds U from a successful
    call; only the solve runs (more right-hand sides, one factorisation). CPU: LAPACK (torch's MKL) on the
    buffers themselves, no copies; elsewhere torch.linalg."""
    if A.device.type != "cpu" or not _ext.HAVE_EXTENSION:
        return torch_spd_solve_(A, Bt, factored)
    return torch.ops.regmean_fast.spd_solve_(A, Bt, factored)


@torch.library.register_fake("regmean_fast::gram_term")
def _gram_term_fake(G, factor, alpha, A=None, S=None):
    check_gram_term_args(G, A, S)
    return G.new_empty((4,))


@torch.library.register_fake("regmean_fast::spd_solve_")
def _spd_solve_inplace_fake(A, Bt, factored=False):
    check_spd_solve_inplace_args(A, Bt)
    return A.new_empty((3,), dtype=torch.int32)


@torch.library.register_fake("regmean_fast::split_bf16x3")
def _split_bf16x3_fake(x):
    if x.dtype != torch.float32:
        raise TypeError(f"split_bf16x3: x must be float32, got {x.dtype}")
    return x.new_empty((3, *x.shape), dtype=torch.bfloat16)


@torch.library.register_fake("regmean_fast::addmm_bf16x3_")
def _addmm_bf16x3_fake(C, A, Bs, alpha):
    if C.dtype != torch.float32 or A.dtype != torch.bfloat16 or Bs.dtype != torch.bfloat16:
        raise TypeError("addmm_bf16x3_: C must be float32, A and Bs bfloat16")


def exact_bf16_products_available(device) -> bool:
    """True when W G products for a bf16 W should go through addmm_bf16x3_ (three bf16 GEMMs) rather
    than one fp32 GEMM on this device: on CUDA, when the extension was built with its cuBLAS kernels; on
    the CPU, when the bf16 path is MKL's (chosen where the CPU has AMX, or forced with
    REGMEAN_FAST_CPU_PATH=mkl-bf16). Three bf16 GEMMs beat one fp32 GEMM only at AMX's rate: with
    AVX512-BF16 alone bf16 runs at ~2.2x fp32, so three of them take ~1.4x one fp32 GEMM."""
    kind = torch.device(device).type
    if not _ext.HAVE_EXTENSION:
        return False
    if kind == "cuda":
        return _ext.HAS_CUDA_BF16X3
    return kind == "cpu" and bf16_gemm_compiled() and _ext.cpu_path_error() is None \
        and _ext._C.cpu_gemm_path("bfloat16") == "mkl-bf16"


def bf16_gemm_compiled() -> bool:
    """True when addmm_bf16x3_ can run on the CPU here (MKL's bf16 GEMM is in the process), fast or not."""
    return _ext.HAVE_EXTENSION and hasattr(_ext._C, "have_bf16_gemm") and bool(_ext._C.have_bf16_gemm())


def split_bf16x3(x: torch.Tensor) -> torch.Tensor:
    """[3, *x.shape] bfloat16 slices of the float32 x with x == s[0] + s[1] + s[2] (exactly, for normal
    numbers): the operand form that makes bf16 GEMMs as accurate as fp32 ones (see addmm_bf16x3_)."""
    return torch.ops.regmean_fast.split_bf16x3(x)


def addmm_bf16x3_(C: torch.Tensor, A: torch.Tensor, Bs: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """In place: ``C += alpha * A @ (Bs[0] + Bs[1] + Bs[2])`` with A bfloat16 [m, k], Bs = split_bf16x3(B)
    [3, k, n], C float32 [m, n] with contiguous rows. Every bf16 x bf16 product is exact in fp32 and
    the sums accumulate in fp32, so this is an fp32-accurate A @ B for a bf16 A (stored weights) at
    the speed of three bf16 GEMMs (AMX on x86, tensor cores through cublasGemmEx on CUDA: several
    times one fp32 GEMM). CPU with MKL or CUDA (exact_bf16_products_available)."""
    torch.ops.regmean_fast.addmm_bf16x3_(C, A, Bs, float(alpha))
    return C


# -- The task-vector merges' per-entry passes (ties, dare_ties, dare_linear) ---------------------------------
# Compiled for contiguous float32 CPU tensors (kernels/task_vectors_cpu.h); the torch_* functions are the same
# contracts in tensor expressions: the reference the kernels are tested against, and the path on other
# devices and dtypes (the same DARE masks bit for bit: the generator is counter-based).

_WORD = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Philox4x32-10's round multipliers (kernels/philox.h)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # its key increments


def philox_words(first: int, count: int, key: tuple[int, int], device=None) -> torch.Tensor:
    """Words [first, first + count) of the Philox4x32-10 stream of ``key`` (two 32-bit words), as int64 in
    [0, 2^32): word j is word j % 4 of Philox4x32-10(counter (j // 4 low 32 bits, high 32 bits, 0, 0), key).
    (int64 products of two 32-bit words wrap as uint64 ones do: their bits are the 64-bit product's.)"""
    b0 = first // 4
    blocks = torch.arange(b0, (first + count + 3) // 4, dtype=torch.int64, device=device)
    c0, c1 = blocks & _WORD, (blocks >> 32) & _WORD
    c2 = c3 = torch.zeros_like(blocks)
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _WORD, (k1 + PHILOX_W[1]) & _WORD
        p0, p1 = c0 * PHILOX_M[0], c2 * PHILOX_M[1]
        c0, c1, c2, c3 = ((p1 >> 32) & _WORD) ^ c1 ^ k0, p1 & _WORD, ((p0 >> 32) & _WORD) ^ c3 ^ k1, p0 & _WORD
    words = torch.stack((c0, c1, c2, c3), dim=1).view(-1)
    return words[first - 4 * b0:first - 4 * b0 + count]


TASK_VECTOR_SLICE = 1 << 20  # entries per pass of the torch paths (their temporaries are a slice's)


_BITS_DTYPE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _slices(*tensors):
    """Matching flat slices of contiguous tensors of the same number of entries, in order (views: writing
    into a slice writes into the tensor)."""
    flats, step = [t.view(-1) for t in tensors], TASK_VECTOR_SLICE
    for a in range(0, flats[0].numel(), step):
        yield [f[a:a + step] for f in flats]


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x|'s bit patterns as integers (the sign bit cleared): ordered as the magnitudes are (finite or inf)."""
    return x.view(_BITS_DTYPE[x.element_size()]) & ((1 << (8 * x.element_size() - 1)) - 1)


def _kth_largest_magnitude(x: torch.Tensor, k: int) -> tuple[int, int]:
    """(the bit pattern of the k-th largest |entry| of x, how many entries are strictly larger). A radix
    select over the magnitudes' bit patterns, 16 bits a pass, each pass a histogram (bincount) built a slice
    at a time: the exact order statistic without a copy of x (torch.kthvalue copies it and adds int64
    indices: 3x the tensor's size)."""
    width = 8 * x.element_size() - 1
    prefix, done, need, larger = 0, 0, k, 0  # the answer's top `done` bits; `need`: its rank among those
    while done < width:
        digits = min(16, width - done)
        shift = width - done - digits
        hist = torch.zeros(1 << digits, dtype=torch.int64, device=x.device)
        for (part,) in _slices(x):
            m = _magnitude_bits(part)
            if done:
                m = m[(m >> (shift + digits)) == prefix]
            hist += torch.bincount((m >> shift) & ((1 << digits) - 1), minlength=1 << digits)
        from_top = hist.flip(0).cumsum(0)  # entries whose digit is >= (top digit - j)
        j = int(torch.searchsorted(from_top, need))
        digit = (1 << digits) - 1 - j
        above = int(from_top[j]) - int(hist[digit])
        larger, need = larger + above, need - above
        prefix, done = (prefix << digits) | digit, done + digits
    return prefix, larger


def magnitude_keep(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k entries of largest magnitude; ties at the k-th magnitude go to the earliest entries."""
    src = (x.cpu() if x.device.type == "mps" else x).contiguous()  # (no bincount on MPS)
    threshold, larger = _kth_largest_magnitude(src, k)
    short = k - larger  # entries at the k-th magnitude that are kept: the first ones
    keep = torch.empty(src.shape, dtype=torch.bool, device=src.device)
    for part, keep_part in _slices(src, keep):
        m = _magnitude_bits(part)
        torch.gt(m, threshold, out=keep_part)
        if short > 0:
            at = m == threshold
            n_at = int(at.sum())
            if n_at > short:  # the first `short` of them (int32 running count: half the memory of int64)
                at &= torch.cumsum(at, 0, dtype=torch.int32) <= short
                n_at = short
            keep_part |= at
            short -= n_at
    return keep.to(x.device)


def _l1(x: torch.Tensor) -> float:
    """sum |x| in fp64, a slice at a time (a whole-tensor fp64 sum makes an fp64 copy of x)."""
    return sum(float(part.abs().sum(dtype=torch.float64)) for (part,) in _slices(x))


def torch_magnitude_drop_(delta: torch.Tensor, k: int) -> tuple[float, float]:
    """magnitude_drop_ in tensor expressions, a slice at a time (any device and dtype)."""
    keep = magnitude_keep(delta, k)
    before = _l1(delta)
    for part, keep_part in _slices(delta, keep):
        part.mul_(keep_part)
    return before, _l1(delta)


def torch_dare_drop_(delta: torch.Tensor, key: tuple[int, int], threshold: int) -> tuple[float, float]:
    """dare_drop_ in tensor expressions, a slice of TASK_VECTOR_SLICE entries at a time (any device, dtype)."""
    before = after = 0.0
    for a, (part,) in zip(range(0, delta.numel(), TASK_VECTOR_SLICE), _slices(delta)):
        before += float(part.abs().sum(dtype=torch.float64))
        part.mul_(philox_words(a, part.numel(), key, part.device) < threshold)
        after += float(part.abs().sum(dtype=torch.float64))
    return before, after


def dare_drop_(delta: torch.Tensor, key: tuple[int, int], threshold: int) -> tuple[float, float]:
    """In place: DARE's random drop of a contiguous tensor. Entry j is kept when word j of the Philox4x32-10
    stream of ``key`` (philox_words) is below ``threshold`` (ceil(density * 2^32): kept with probability
    density), else multiplied by 0. Returns (sum |delta| before, after), summed in fp64. The same mask on any
    device and thread count."""
    if not delta.is_contiguous():
        raise ValueError("dare_drop_: delta must be contiguous")
    if not 0 <= threshold <= 1 << 32:
        raise ValueError(f"dare_drop_: threshold {threshold} is outside [0, 2^32]")
    if (_ext.HAVE_EXTENSION and hasattr(_ext._C, "dare_drop_") and delta.device.type == "cpu"
            and delta.dtype == torch.float32):
        return _ext._C.dare_drop_(delta, key[0] & _WORD, key[1] & _WORD, threshold)
    return torch_dare_drop_(delta, key, threshold)


def magnitude_drop_(delta: torch.Tensor, k: int) -> tuple[float, float]:
    """In place: TIES's magnitude sparsification of a contiguous tensor: the k entries of largest magnitude are
    kept (among equal magnitudes at the cut-off, the earliest), the others multiplied by 0. Returns (sum |delta|
    before, after) in fp64. Compiled for float32 CPU tensors (a radix select over the magnitudes' bits, then one
    pass); elsewhere torch_magnitude_drop_."""
    if not delta.is_contiguous():
        raise ValueError("magnitude_drop_: delta must be contiguous")
    if not 1 <= k <= delta.numel():
        raise ValueError(f"magnitude_drop_: k = {k} is outside [1, {delta.numel()}]")
    if (_ext.HAVE_EXTENSION and hasattr(_ext._C, "magnitude_drop_") and delta.device.type == "cpu"
            and delta.dtype == torch.float32):
        return _ext._C.magnitude_drop_(delta, int(k))
    return torch_magnitude_drop_(delta, k)


def torch_consensus_merge_(base, deltas, coeffs, weights, normalize: bool, scaling: float) -> torch.Tensor:
    """consensus_merge_ in tensor expressions, a slice at a time (any device, dtype)."""
    for base_part, *parts in _slices(base, *deltas):
        taus = [p * c for p, c in zip(parts, coeffs)]
        elected = torch.where(sum(taus) >= 0, 1.0, -1.0).to(base.dtype)
        mixed = torch.zeros_like(base_part)
        divisor = torch.zeros_like(base_part)
        for tau, w in zip(taus, weights):
            agree = torch.sign(tau) == elected
            mixed.add_(torch.where(agree, tau, torch.zeros((), dtype=tau.dtype, device=tau.device)))
            divisor.add_(agree.to(divisor.dtype), alpha=w)
        if normalize:
            mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
        base_part.add_(mixed, alpha=scaling)
    return base


def consensus_merge_(base: torch.Tensor, deltas, coeffs, weights, normalize: bool, scaling: float) -> torch.Tensor:
    """In place, TIES's sign consensus and disjoint mean: with tau_i = coeffs[i] * deltas[i], the elected sign
    is + where sum_i tau_i >= 0, else -; ``base += scaling * mixed`` where mixed = the sum of the tau_i whose
    sign is the elected one, divided (normalize) by the sum of their ``weights[i]`` (1 where none agrees).
    base and deltas: contiguous, one shape and dtype. Returns base."""
    if not deltas or len(coeffs) != len(deltas) or len(weights) != len(deltas):
        raise ValueError("consensus_merge_: one coefficient and one weight per delta, at least one delta")
    if any(not t.is_contiguous() or t.shape != base.shape or t.dtype != base.dtype for t in (base, *deltas)):
        raise ValueError("consensus_merge_: base and deltas must be contiguous, of one shape and dtype")
    if (_ext.HAVE_EXTENSION and hasattr(_ext._C, "consensus_merge_") and base.device.type == "cpu"
            and base.dtype == torch.float32):
        _ext._C.consensus_merge_(base, list(deltas), [float(c) for c in coeffs], [float(w) for w in weights],
                                 bool(normalize), float(scaling))
        return base
    return torch_consensus_merge_(base, deltas, coeffs, weights, normalize, scaling)


def torch_scaled_add_(acc: torch.Tensor, x: torch.Tensor, c: float, assign: bool = False) -> torch.Tensor:
    """scaled_add_ in tensor expressions (any device and dtypes)."""
    if assign:
        return acc.copy_(x).mul_(c)
    return acc.add_(x, alpha=c)


def scaled_add_(acc: torch.Tensor, x: torch.Tensor, c: float, assign: bool = False) -> torch.Tensor:
    """In place: ``acc = c * x`` (assign) or ``acc += c * x``, computed in acc's dtype from x as stored (a
    bfloat16/float16 x is widened exactly, no copy of it in acc's dtype first): the weighted sums of the
    merge, straight from the bytes read from a checkpoint. Compiled for a contiguous float32 CPU acc and a
    contiguous float32/bfloat16/float16 CPU x of its size; elsewhere torch. Returns acc."""
    if x.shape != acc.shape:
        raise ValueError(f"scaled_add_: x's shape {tuple(x.shape)} is not acc's {tuple(acc.shape)}")
    if (_ext.HAVE_EXTENSION and hasattr(_ext._C, "scaled_add_") and acc.device.type == "cpu"
            and x.device.type == "cpu" and acc.dtype == torch.float32 and x.dtype in GRAM_DTYPES
            and acc.is_contiguous() and x.is_contiguous()):
        _ext._C.scaled_add_(acc, x, float(c), bool(assign))
        return acc
    return torch_scaled_add_(acc, x, c, assign)
