"""The closed-form RegMean solve, the fast path used by the merge engine.

For one shared-input group (the modules reading the same input, e.g. q/k/v) and K models:

    S_i = c_i (alpha N(G_i) + (1 - alpha) diag(N(G_i)))      (model_term: one read of each Gram)
    A = sum_i S_i,   B^T = sum_i W_i S_i                      (add_rhs: all modules' W_i stacked)
    W*^T = B^T A^-1 = sum_i W_i (S_i A^-1)                    (one Cholesky for the group; the second
                                                                order when the group is wider than K d)

N divides by the token count ("mean", the published codes' choice) or not ("sum"). The reference
implementation (regmean_fast.reference) is the oracle these are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import ops

NORMALIZATIONS = ("mean", "sum")
# Input size from which W G goes through exact bf16x3 products (three AMX GEMMs) rather than one fp32
# GEMM: on the quiet 2-core AMX machine 1.8x at 1024 x 1024, 2.0x at 5632 x 1024 and 4096 x 4096;
# below a few hundred the per-call overheads dominate either way.
EXACT_BF16_MIN_DIM = 512
RIDGE_START = 1e-6
RIDGE_MAX = 1e-1


@dataclass
class SolveReport:
    """What the solve needed: the plain Cholesky, a ridge (lambda * mean(diag) * I), or least squares."""

    method: str = "cholesky"  # "cholesky", "cholesky+ridge" or "lstsq"
    ridge: float = 0.0  # lambda used (relative to mean(diag(A)))
    attempts: int = 1
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"method": self.method, "ridge": self.ridge, "attempts": self.attempts, "notes": list(self.notes)}


def normalized_coeffs(coeffs: Sequence[float] | None, k: int) -> list[float]:
    """Model weights c_i, validated and scaled to sum to 1 (None -> equal weights)."""
    if coeffs is None:
        return [1.0 / k] * k
    c = [float(x) for x in coeffs]
    if len(c) != k:
        raise ValueError(f"got {len(c)} coefficients for {k} models")
    if any(x < 0 or x != x for x in c):
        raise ValueError(f"coefficients must be non-negative numbers, got {c}")
    total = sum(c)
    if total <= 0:
        raise ValueError("coefficients must not all be zero")
    return [x / total for x in c]


def gram_scales(counts: Sequence[int] | None, k: int, normalization: str) -> list[float]:
    """The factor N(G) = scale * G for each model."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if normalization == "sum" or counts is None:
        return [1.0] * k
    if len(counts) != k:
        raise ValueError(f"got {len(counts)} token counts for {k} models")
    if any(int(n) <= 0 for n in counts):
        raise ValueError(f"token counts must be positive, got {list(counts)}")
    return [1.0 / float(n) for n in counts]


def model_term(A: torch.Tensor, G: torch.Tensor, factor: float, alpha: float, *, split: bool = False,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple | None]:
    """One model's share of a group's matrix: S = factor (alpha G + (1 - alpha) diag(G)), A's upper
    triangle += S's (call symmetrize_upper_(A) once all models are in), and G's symmetry_stats, without a
    temporary (ops.gram_term) when G and A are float32; other dtypes through tensor expressions (stats
    then only for a float32 G, else None).

    Returns (S, stats) with S in the form add_rhs takes: the fp32 matrix, its bf16x3 slices (split=True:
    for bf16 weights, see ops.addmm_bf16x3_), or for alpha == 0 only its diagonal (the term is diagonal).
    out: a buffer for S of the right shape and dtype ([d, d] fp32, or [3, d, d] bf16 when split)."""
    d = G.size(0)
    if A.dtype == torch.float32 and G.dtype == torch.float32 and G.is_contiguous():
        if alpha == 0.0:
            stats = ops.gram_term(G, factor, alpha, A)
            return torch.diagonal(G) * factor, stats
        if out is None:
            out = torch.empty((3, d, d) if split else (d, d), dtype=torch.bfloat16 if split else torch.float32,
                              device=G.device)
        return out, ops.gram_term(G, factor, alpha, A, out)
    stats = ops.symmetry_stats(G) if G.dtype == torch.float32 else None
    Gs = G.to(A.dtype)
    if alpha == 0.0:
        S = torch.diagonal(Gs) * factor
        A.diagonal().add_(S)
        return S, stats
    S = Gs * (factor * alpha)
    S.diagonal().copy_(torch.diagonal(Gs) * factor)
    A.add_(torch.triu(S))
    if split:
        S = ops.split_bf16x3(S)
    return S, stats


def symmetrize_upper_(A: torch.Tensor) -> torch.Tensor:
    """In place: A's strict lower triangle = its upper triangle's transpose (after model_term)."""
    if A.dtype == torch.float32 and A.is_contiguous() and A.device.type == "cpu":
        return ops.symmetrize_(A)
    A.copy_(torch.triu(A) + torch.triu(A, diagonal=1).T)
    return A


def add_rhs(Bt: torch.Tensor, W: torch.Tensor, S: torch.Tensor) -> None:
    """Bt += W S for one module, in place: W [d_out, d_in] (oriented), Bt its rows of the transposed
    right-hand side, S from model_term (symmetric: (S W^T)^T = W S) or any [d_in, d_in] M. Every operand
    is row-major.
    bf16x3 slices need a bfloat16 W (the stored weights of a bf16 checkpoint): three bf16 GEMMs with exact
    products and fp32 accumulation, as accurate as fp32 and several times faster (AMX)."""
    if S.dim() == 1:
        Bt.addcmul_(W.to(Bt.dtype), S.unsqueeze(0))
    elif S.dim() == 3:
        ops.addmm_bf16x3_(Bt, W, S, 1.0)
    else:
        Bt.addmm_(W.to(S.dtype), S)


def _cholesky_attempt(A: torch.Tensor, Bt: torch.Tensor | None) -> bool:
    """One Cholesky attempt, in place: True with Bt <- Bt A^-1 (and, on the CPU, A's upper triangle
    holding the factor), or False (info > 0 or a non-finite factor) with A and Bt as they were.
    Bt=None factors only (CPU). CPU: LAPACK on the buffers (ops.spd_solve_); CUDA: cuSOLVER
    (ops.spd_solve: Xpotrf + Xpotrs, one device-to-host copy of the info)."""
    if A.device.type == "cpu":
        rhs = Bt if Bt is not None else A.new_empty((0, A.size(0)))
        potrf_info, nonfinite, _ = ops.spd_solve_(A, rhs).tolist()
        return potrf_info == 0 and nonfinite == 0
    if ops.HAS_SPD_SOLVE_OP and A.dtype in (torch.float32, torch.float64) and Bt.dtype == A.dtype:
        X, info = ops.spd_solve(A, Bt.T)
        potrf_info, nonfinite, _ = info.tolist()
        ok = potrf_info == 0 and nonfinite == 0
    else:
        L, info = torch.linalg.cholesky_ex(A)
        ok = int(info) == 0 and ops.all_finite(L)
        X = torch.cholesky_solve(Bt.T, L) if ok else None
    if ok:
        Bt.copy_(X.T)
    return ok


def _ridge_escalation(A: torch.Tensor, attempt) -> SolveReport:
    """attempt() (a Cholesky attempt on A) as is, then with lambda * mean(diag(A)) * I added, lambda = 1e-6,
    1e-5, ... up to 1e-1. Returns the report; method "lstsq" (A as given) when every attempt failed."""
    report = SolveReport()
    if attempt():
        return report
    diag = torch.diagonal(A).clone()  # a failed attempt leaves A as it was
    scale = float(diag.abs().mean())
    if scale == 0.0 or scale != scale:
        scale = 1.0
    lam = RIDGE_START
    while lam <= RIDGE_MAX * (1 + 1e-9):
        report.attempts += 1
        torch.diagonal(A).copy_(diag + lam * scale)
        if attempt():
            report.method, report.ridge = "cholesky+ridge", lam
            return report
        lam *= 10.0
    torch.diagonal(A).copy_(diag)
    report.attempts += 1
    report.method, report.ridge = "lstsq", 0.0
    report.notes.append("Cholesky failed even with a ridge of 1e-1 * mean(diag); used least squares")
    return report


def robust_cholesky_(A: torch.Tensor) -> SolveReport:
    """Factor the CPU matrix A in place (its upper triangle becomes U, A = U^T U; see ops.spd_solve_) with
    robust_spd_solve_'s ridge escalation; then ops.spd_solve_(A, Bt, factored=True) solves. Method "lstsq":
    no factor (A as given), the caller must solve otherwise."""
    if not ops.all_finite(A):
        raise FloatingPointError("non-finite values in the system to solve")
    return _ridge_escalation(A, lambda: _cholesky_attempt(A, None))


def robust_spd_solve_(A: torch.Tensor, Bt: torch.Tensor) -> SolveReport:
    """Solve A X = Bt^T in place (Bt <- X^T = Bt A^-1) for symmetric positive (semi-)definite A [d, d] and
    Bt [k, d], both contiguous; A is overwritten.

    Cholesky first; when it fails (info > 0, or a non-finite factor, which CUDA can return with info == 0)
    add lambda * mean(diag(A)) * I with lambda = 1e-6, 1e-5, ... up to 1e-1; then least squares.
    """
    if not ops.all_finite(A) or not ops.all_finite(Bt):
        raise FloatingPointError("non-finite values in the system to solve")
    report = _ridge_escalation(A, lambda: _cholesky_attempt(A, Bt))
    if report.method == "lstsq":
        X = torch.linalg.lstsq(A.double().cpu(), Bt.T.double().cpu(), driver="gelsd").solution
        Bt.copy_(X.T)
    return report


def robust_spd_solve(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, SolveReport]:
    """Solve A X = B for symmetric positive (semi-)definite A, as robust_spd_solve_; A and B are not
    modified. Returns (X, report)."""
    Bt = B.T.contiguous()
    report = robust_spd_solve_(A.clone(memory_format=torch.contiguous_format), Bt)
    return Bt.T, report


def regmean_group(weights: Sequence[Sequence[torch.Tensor]], grams: Sequence[torch.Tensor], *,
                  alpha: float = 1.0, coeffs: Sequence[float] | None = None,
                  counts: Sequence[int] | None = None, normalization: str = "mean",
                  solve_dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], SolveReport]:
    """Merge every module of one shared-input group with one factorisation.

    weights[m][i]: module m's weight in model i, oriented [d_out_m, d_in] (callers transpose
    transformers Conv1D weights). grams[i]: model i's raw symmetric Gram [d_in, d_in];
    counts[i]: its token count (needed for normalization="mean"). Returns the merged weights
    (solve_dtype, [d_out_m, d_in] each) and what the solve needed.
    """
    k = len(grams)
    if k == 0:
        raise ValueError("no models to merge")
    for m, per_model in enumerate(weights):
        if len(per_model) != k:
            raise ValueError(f"module {m}: {len(per_model)} weights for {k} Grams")
    d = grams[0].size(0)
    for i, G in enumerate(grams):
        if G.shape != (d, d):
            raise ValueError(f"Gram {i} has shape {tuple(G.shape)}, expected ({d}, {d})")
    for m, per_model in enumerate(weights):
        for i, W in enumerate(per_model):
            if W.dim() != 2 or W.size(1) != d:
                raise ValueError(f"module {m}, model {i}: weight shape {tuple(W.shape)} does not take inputs of size {d}")
    factors = [c * s for c, s in zip(normalized_coeffs(coeffs, k), gram_scales(counts, k, normalization))]
    device = grams[0].device
    A = torch.zeros(d, d, dtype=solve_dtype, device=device)
    widths = [per_model[0].size(0) for per_model in weights]
    Bt = torch.zeros(sum(widths), d, dtype=solve_dtype, device=device)
    for i, (G, f) in enumerate(zip(grams, factors)):
        S, _ = model_term(A, G, f, alpha)
        off = 0
        for per_model, width in zip(weights, widths):
            add_rhs(Bt[off:off + width], per_model[i].to(device=device, dtype=solve_dtype), S)
            off += width
    report = robust_spd_solve_(symmetrize_upper_(A), Bt)
    return list(torch.split(Bt, widths, dim=0)), report


def regmean_solve(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 1.0,
                  coeffs: Sequence[float] | None = None) -> torch.Tensor:
    """Merge one layer: K weights [d_out, d_in] and their already normalised Grams [d_in, d_in].

    Solved in float64 when any input is float64, else float32; returned in the weights' dtype.
    """
    wide = torch.float64 if any(t.dtype == torch.float64 for t in [*weights, *grams]) else torch.float32
    merged, _ = regmean_group([list(weights)], list(grams), alpha=alpha, coeffs=coeffs, normalization="sum",
                              solve_dtype=wide)
    return merged[0].to(weights[0].dtype)
