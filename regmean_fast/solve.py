"""The closed-form RegMean solve, the fast path used by the merge engine.

For one shared-input group (the modules reading the same input, e.g. q/k/v) and K models:

    S_i = c_i (alpha N(G_i) + (1 - alpha) diag(N(G_i)))      (model_term: one read of each Gram)
    A = sum_i S_i,   R^T = sum_i (W_i - W_0) S_i              (add_delta_rhs: all modules stacked)
    W*^T = W_0^T + A^-1 R                                     (one Cholesky for the group; or
                                                                W_0 + sum_i (W_i - W_0) (S_i A^-1)
                                                                when the group is wider than K d)

the RegMean solution W*^T = A^-1 sum_i S_i W_i^T written relative to model 0, so that K identical models
give it back exactly and the rounding scales with the models' differences. A sum that is not positive
definite is shifted (by its fp32 rounding level, else a ridge) toward the models' average; the condition
of each solve is estimated from its Cholesky factor, and an fp32 solve whose expected error exceeds
PRECISION_TOL is redone in fp64 (solve_group).

N divides by the token count ("mean", the published codes' choice) or not ("sum"). The reference
implementation (regmean_fast.reference) is the oracle these are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import ops

NORMALIZATIONS = ("mean", "sum")
EPS32 = torch.finfo(torch.float32).eps
# The merged weights' relative error the solve must reach: above it (as estimated), an fp32 solve is redone
# in fp64, and an fp64 solve that cannot reach it says so. Weights written in a narrower dtype get
# solve_tolerance's looser bound: an error far below their own rounding changes nothing a reader sees.
PRECISION_TOL = 1e-5
# ... that bound: this fraction of the output dtype's unit roundoff (bf16: 2.4e-4, fp16: 3.1e-5).
OUTPUT_ROUNDING_FRACTION = 1.0 / 16.0
# A Gram is stored in fp32: entry (i, j) of the sum is exact only to about EPS32 sqrt(a_ii a_jj) (times a small
# factor), so a sum that is not positive definite as stored is repaired by raising each a_jj by rel * a_jj,
# rel = these multiples of EPS32 ||D^-1/2 A D^-1/2||_1 (up to beyond sqrt(d) times it), before any ridge
# rel = RIDGE_START..RIDGE_MAX is tried.
REPAIR_STEPS = (1.0, 8.0, 64.0, 512.0)
RIDGE_START = 1e-6
RIDGE_MAX = 1e-1
# Rows of W_i - W_0 formed at a time (in the solve dtype) before their product with S_i.
DELTA_CHUNK_ELEMS = 1 << 22


@dataclass
class SolveReport:
    """What the solve needed and how accurate it is expected to be.

    method: "cholesky"; "cholesky+repair" (the sum was not positive definite as stored, i.e. within its
    rounding: its diagonal raised by a multiple of its fp32 rounding level); "cholesky+ridge" (more); "lstsq"
    (no shift made it factorise). Every shift Lambda (diagonal) pulls toward the models' average, not toward
    zero: (A + Lambda) W^T = sum_i G~_i W_i^T + Lambda W_avg^T.
    ridge: the shift relative to each diagonal entry (Lambda = ridge diag(A); the mean's for a zero one). cond: the condition number of the diagonally scaled system,
    estimated from the Cholesky factor. error: the expected relative error of the merged weights (cond *
    eps(dtype) * max_i ||W_i - W_0|| / ||W_0||). dtype: the solve's dtype; escalated: an fp32 solve whose
    expected error exceeded PRECISION_TOL was redone in fp64 (fp32_error: its estimate)."""

    method: str = "cholesky"
    ridge: float = 0.0
    attempts: int = 1
    cond: float | None = None
    error: float | None = None
    dtype: str = "float32"
    escalated: bool = False
    fp32_error: float | None = None
    tol: float | None = None  # the tolerance it was held to (None: PRECISION_TOL)
    notes: list = field(default_factory=list)

    @property
    def tolerance(self) -> float:
        return PRECISION_TOL if self.tol is None else self.tol

    @property
    def precise(self) -> bool:
        """The expected error is within the tolerance (unknown, for least squares, counts as not)."""
        return self.error is not None and self.error <= self.tolerance

    def as_dict(self) -> dict:
        d = {"method": self.method, "ridge": self.ridge, "attempts": self.attempts, "cond": self.cond,
             "error": self.error, "dtype": self.dtype, "escalated": self.escalated, "notes": list(self.notes)}
        if self.escalated:
            d["fp32_error"] = self.fp32_error
        return d


def solve_tolerance(out_dtype: torch.dtype | None) -> float:
    """The relative error a group solve must reach for weights written in out_dtype: PRECISION_TOL, or
    OUTPUT_ROUNDING_FRACTION of out_dtype's unit roundoff when that is larger (bf16, fp16): the merged weights
    as written then differ from an exact solve of the stored Grams by a small fraction of their own rounding,
    and an fp32 solve that reaches this is not redone in fp64 for nothing."""
    if out_dtype is None or not out_dtype.is_floating_point or out_dtype.itemsize >= 4:
        return PRECISION_TOL
    return max(PRECISION_TOL, torch.finfo(out_dtype).eps / 2 * OUTPUT_ROUNDING_FRACTION)


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


def model_term(A: torch.Tensor, G: torch.Tensor, factor: float, alpha: float,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, tuple | None]:
    """One model's share of a group's matrix: S = factor (alpha G + (1 - alpha) diag(G)), A's upper
    triangle += S's (call symmetrize_upper_(A) once all models are in), and G's symmetry_stats (for a
    float32 G; else None), in one pass over G (ops.gram_term) when G and A are float32.

    Returns (S, stats): S in out ([d, d], A's dtype), or None when out is None (only A grows); for
    alpha == 0 the term is diagonal and S is that diagonal ([d], A's dtype) either way."""
    stats = None
    if A.dtype == torch.float32 and G.dtype == torch.float32 and G.is_contiguous():
        stats = ops.gram_term(G, factor, alpha, A, out if alpha != 0.0 else None)
        return (torch.diagonal(G) * factor if alpha == 0.0 else out), stats
    if G.dtype == torch.float32:
        stats = ops.symmetry_stats(G)
    if alpha == 0.0:
        S = torch.diagonal(G).to(A.dtype) * factor
        A.diagonal().add_(S)
        return S, stats
    S = torch.empty_like(A) if out is None else out
    S.copy_(G).mul_(factor * alpha)  # in A's dtype: G converted exactly, then scaled
    torch.diagonal(S).copy_(torch.diagonal(G)).mul_(factor)
    A.add_(S)  # the lower triangle too; symmetrize_upper_ rewrites it from the upper one
    return (None if out is None else S), stats


def symmetrize_upper_(A: torch.Tensor) -> torch.Tensor:
    """In place: A's strict lower triangle = its upper triangle's transpose (after model_term)."""
    if A.dtype == torch.float32 and A.is_contiguous() and A.device.type == "cpu":
        return ops.symmetrize_(A)
    A.copy_(torch.triu(A) + torch.triu(A, diagonal=1).T)
    return A


def add_delta_rhs(Bt: torch.Tensor, ws: Sequence[torch.Tensor], w0s: Sequence[torch.Tensor],
                  S: torch.Tensor, scratch=None) -> float:
    """Bt += (W - W_0) S, block by block (ws, w0s: one model's and model 0's member weights, oriented
    [d_out_m, d_in], stacked as Bt's rows), with W - W_0 formed in Bt's dtype a few rows at a time before the
    product: the rounding of the right-hand side is then relative to the models' differences, not to the
    weights (K identical models give exactly zero). S: [d, d], or a diagonal as a [d] vector (alpha == 0, a
    shift). scratch(name, shape, dtype, device) -> a reusable buffer. Returns ||W - W_0||_F^2."""
    d = Bt.size(1)
    rows = max(256, DELTA_CHUNK_ELEMS // max(d, 1))
    sq, off = 0.0, 0
    for W, W0 in zip(ws, w0s):
        for r in range(0, W.size(0), rows):
            n = min(rows, W.size(0) - r)
            D = (scratch("D", (n, d), Bt.dtype, Bt.device) if scratch is not None
                 else torch.empty((n, d), dtype=Bt.dtype, device=Bt.device))
            D.copy_(W[r:r + n]).sub_(W0[r:r + n])
            sq += float(torch.linalg.vector_norm(D, dtype=torch.float64)) ** 2
            dst = Bt[off + r:off + r + n]
            if S.dim() == 1:
                dst.addcmul_(D, S.unsqueeze(0))
            else:
                dst.addmm_(D, S)
        off += W.size(0)
    return sq


# -- factorisation --------------------------------------------------------------------------------------
class Factor:
    """The Cholesky factor of a (possibly shifted) symmetric A, made in place: CPU, LAPACK on the buffer
    (A's upper triangle becomes U, A = U^T U; ops.spd_solve_); elsewhere torch.linalg.cholesky_ex."""

    def __init__(self, A: torch.Tensor, L: torch.Tensor | None):
        self.A, self.L = A, L

    @staticmethod
    def attempt(A: torch.Tensor) -> "Factor | None":
        """One Cholesky attempt: a Factor, or None (info > 0 or a non-finite factor) with A as it was."""
        if A.device.type == "cpu":
            potrf_info, nonfinite, _ = ops.spd_solve_(A, A.new_empty((0, A.size(0)))).tolist()
            return Factor(A, None) if potrf_info == 0 and nonfinite == 0 else None
        L, info = torch.linalg.cholesky_ex(A)
        return Factor(A, L) if int(info) == 0 and ops.all_finite(L) else None

    def diagonal(self) -> torch.Tensor:
        return torch.diagonal(self.A if self.L is None else self.L)

    def solve_(self, Bt: torch.Tensor) -> None:
        """In place: Bt <- Bt A^-1 (Bt [k, d], contiguous; A symmetric, so (A^-1 Bt^T)^T)."""
        if self.L is None:
            ops.spd_solve_(self.A, Bt, factored=True)
        else:
            Bt.copy_(torch.cholesky_solve(Bt.T, self.L).T)


def robust_factor_(A: torch.Tensor) -> tuple[Factor | None, torch.Tensor | None, SolveReport]:
    """Factor the symmetric A in place, shifting its diagonal when it is not positive definite. The shift is
    relative to each diagonal entry (a dimension no data excites, diagonal 0, takes the mean's): rel * a_jj,
    like a slightly smaller alpha, so a few massive input dimensions do not swamp the others. First rel =
    REPAIR_STEPS multiples of the fp32 rounding level EPS32 ||D^-1/2 A D^-1/2||_1 (a sum of fp32 Grams
    that is not positive definite as stored is rounding, not data), then rel = RIDGE_START..RIDGE_MAX.
    Returns (the factor, or None when no shift worked (A then as given: least squares); the shift vector
    added to A's diagonal, or None; the report: method, ridge = rel, attempts, estimated condition)."""
    if not ops.all_finite(A):
        raise FloatingPointError("non-finite values in the system to solve")
    report = SolveReport(dtype=str(A.dtype).replace("torch.", ""))
    diag = torch.diagonal(A).clone()  # a failed attempt leaves A as it was
    norm1 = scaled_norm1(A)
    fac, shift = Factor.attempt(A), None
    if fac is None:
        mean = float(diag.mean()) if diag.numel() else 0.0
        base = torch.where(diag > 0, diag, mean if mean > 0 else 1.0)
        level = EPS32 * norm1
        steps = [("cholesky+repair", m * level) for m in REPAIR_STEPS]
        lam = RIDGE_START
        while lam <= RIDGE_MAX * (1 + 1e-9):
            if lam > steps[-1][1]:
                steps.append(("cholesky+ridge", lam))
            lam *= 10.0
        for method, rel in steps:
            report.attempts += 1
            shift = rel * base
            torch.diagonal(A).copy_(diag + shift)
            fac = Factor.attempt(A)
            if fac is not None:
                report.method, report.ridge = method, rel
                break
        else:
            torch.diagonal(A).copy_(diag)
            report.attempts += 1
            report.method, shift = "lstsq", None
            report.notes.append("Cholesky failed even with a ridge of 1e-1 * diag; used least squares")
    if fac is not None:
        report.cond = scaled_cond_estimate(fac, diag if shift is None else diag + shift, norm1)
    return fac, shift, report


def scaled_cond_estimate(fac: Factor, diag: torch.Tensor, norm1: float, steps: int = 5) -> float:
    """An estimate of the 1-norm condition number of D^-1/2 A D^-1/2 (D = diag(A), A = the factored matrix, of
    unit diagonal once scaled): what Cholesky's accuracy depends on (van der Sluis), not the spread of the
    diagonal (a few massive input dimensions). norm1 = ||D^-1/2 A D^-1/2||_1 (scaled_norm1, before factoring)
    times Hager and Higham's estimate of ||D^1/2 A^-1 D^1/2||_1 (LAPACK's xLACON: a few solves with one
    right-hand side, O(d^2) each): an estimate of the 1-norm condition, which bounds the 2-norm one."""
    d = diag.numel()
    if d == 0:
        return 1.0
    root = diag.to(torch.float64).clamp_min(0).sqrt()
    if float(root.min()) == 0.0:
        return math.inf

    def apply(x):  # D^1/2 A^-1 D^1/2 x, in the factor's dtype
        y = (x * root).to(diag.dtype).unsqueeze(0).contiguous()
        fac.solve_(y)
        return y[0].to(torch.float64) * root

    x = torch.full((d,), 1.0 / d, dtype=torch.float64, device=diag.device)
    est, j_prev = 0.0, -1
    for _ in range(steps):
        y = apply(x)
        est = float(y.abs().sum())
        z = apply(torch.where(y >= 0, 1.0, -1.0).to(torch.float64))
        j = int(z.abs().argmax())
        if j == j_prev or float(z.abs().max()) <= float(z @ x):
            break
        x, j_prev = torch.zeros_like(x), j
        x[j] = 1.0
    alt = torch.arange(d, dtype=torch.float64, device=diag.device)  # Higham's safeguard vector
    alt = (1.0 + alt / max(d - 1, 1)) * torch.where(alt % 2 == 0, 1.0, -1.0).to(torch.float64)
    est = max(est, 2.0 * float(apply(alt).abs().sum()) / (3.0 * d))
    if not math.isfinite(est):
        return math.inf
    return max(1.0, norm1 * est)


def scaled_norm1(A: torch.Tensor) -> float:
    """||D^-1/2 A D^-1/2||_1 for the symmetric A (D = diag(A); a zero diagonal entry counts as 1), a few rows
    at a time (no d x d temporary)."""
    d = A.size(0)
    diag = torch.diagonal(A).to(torch.float64)
    rinv = torch.where(diag > 0, diag.clamp_min(1e-300).rsqrt(), 1.0)
    rows = max(1, DELTA_CHUNK_ELEMS // max(d, 1))
    best = 0.0
    for r in range(0, d, rows):
        sums = (A[r:r + rows].abs().to(torch.float64) @ rinv) * rinv[r:r + rows]
        best = max(best, float(sums.max()))
    return max(best, 1.0)


def expected_error(report: SolveReport, dtype: torch.dtype, delta: float, scale: float) -> float | None:
    """The merged weights' expected relative error: cond * eps(dtype) * delta / scale, where delta is the
    largest ||W_i - W_0|| (what the right-hand side is made of) and scale ||W_0||; 0 when the models agree."""
    if report.cond is None:
        return None
    if delta == 0.0:
        return 0.0
    return torch.finfo(dtype).eps * (1.0 + report.cond * delta / max(scale, delta * 1e-30))


def robust_spd_solve_(A: torch.Tensor, Bt: torch.Tensor) -> SolveReport:
    """Solve A X = Bt^T in place (Bt <- X^T = Bt A^-1) for symmetric positive (semi-)definite A [d, d] and
    Bt [k, d], both contiguous; A is overwritten. robust_factor_'s shifts (toward zero: there is no
    average here; the merge's group solve shifts toward the models' average), then least squares."""
    if not ops.all_finite(Bt):
        raise FloatingPointError("non-finite values in the system to solve")
    fac, _, report = robust_factor_(A)
    if fac is None:
        Bt.copy_(_lstsq(A, Bt))
    else:
        fac.solve_(Bt)
    return report


def robust_spd_solve(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, SolveReport]:
    """Solve A X = B for symmetric positive (semi-)definite A, as robust_spd_solve_; A and B are not
    modified. Returns (X, report)."""
    Bt = B.T.contiguous()
    report = robust_spd_solve_(A.clone(memory_format=torch.contiguous_format), Bt)
    return Bt.T, report


def _lstsq(A: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """Bt A^+ (minimum norm), in fp64 on the CPU, returned in Bt's dtype and device."""
    X = torch.linalg.lstsq(A.double().cpu(), Bt.T.double().cpu(), driver="gelsd").solution
    return X.T.to(dtype=Bt.dtype, device=Bt.device)


# -- one shared-input group --------------------------------------------------------------------------------
def _scratch_or_new(scratch):
    if scratch is not None:
        return scratch
    return lambda name, shape, dtype, device: torch.empty(shape, dtype=dtype, device=device)


class _Escalate(Exception):
    """An fp32 group solve whose expected error exceeds its tolerance (carries its report)."""

    def __init__(self, report):
        super().__init__("escalate")
        self.report = report


def solve_group(k: int, load_gram, load_weights, factors: Sequence[float], coeffs: Sequence[float], alpha: float,
                dtype: torch.dtype = torch.float32, *, check_gram=None, scratch=None,
                terms_first: bool = False, tol: float | None = None) -> tuple[torch.Tensor, list[int], SolveReport]:
    """RegMean for one shared-input group, relative to model 0 (the anchor):

        (A + lambda I) X^T = sum_i S_i (W_i - W_0)^T + lambda (W_avg - W_0)^T,   W* = W_0 + X

    with A = sum_i S_i, S_i = factors[i] (alpha G_i + (1 - alpha) diag(G_i)), W_avg = sum_i coeffs[i] W_i
    and lambda = 0 unless A needs a shift (robust_factor_). That is the RegMean solution, shrunk toward the
    average where a shift is needed; K identical models give W_0 back exactly, whatever the conditioning, and
    the rounding of the right-hand side is relative to the models' differences, not to the weights.

    load_gram(i) -> model i's raw fp32 Gram [d, d] (contiguous; checked by check_gram(i, stats) when given);
    load_weights(i, d, name) -> (model i's member weights oriented [d_out_m, d] (any float dtype, each a
    block of the stacked rows; name: a scratch buffer they may be read into: model 0's are kept as the anchor
    while the others are read), their widths). coeffs: the models' weights, summing to 1.
    terms_first: solve each model's d x d term against the factored A and multiply (fewer flops when the
    group has more rows than K d; float32 only; falls back to the streaming solve for least squares).

    When the expected relative error of an fp32 solve (SolveReport.error) exceeds tol (default PRECISION_TOL;
    solve_tolerance(out dtype) for weights written narrower), the group is solved again in fp64
    (report.escalated). Returns (W* stacked [sum widths, d] in the solve dtype, widths,
    report)."""
    check_gram = check_gram or (lambda i, stats: None)
    scratch = _scratch_or_new(scratch)
    args = (k, load_gram, load_weights, factors, coeffs, alpha, check_gram, scratch, tol)
    try:
        if terms_first and dtype == torch.float32 and alpha != 0.0:
            res = _solve_terms_first(*args)
            if res is not None:
                return res
        return _solve_streaming(*args, dtype)
    except _Escalate as e:
        if dtype != torch.float32:
            raise
        first = e.report
    Bt, widths, report = _solve_streaming(*args, torch.float64)
    report.escalated, report.fp32_error = True, first.error
    return Bt, widths, report


def _finish(report, dtype, sq, w0s) -> None:
    """The report's expected error; _Escalate for an fp32 solve above its tolerance."""
    scale = math.sqrt(sum(float(torch.linalg.vector_norm(w, dtype=torch.float64)) ** 2 for w in w0s))
    report.error = expected_error(report, dtype, math.sqrt(max(sq)), scale)
    if dtype == torch.float32 and not report.precise:
        raise _Escalate(report)


def _add_anchor(Bt, w0s) -> None:
    off = 0
    for W0 in w0s:
        Bt[off:off + W0.size(0)].add_(W0)
        off += W0.size(0)


def _solve_streaming(k, load_gram, load_weights, factors, coeffs, alpha, check_gram, scratch, tol, dtype):
    """One pass over the models (one Gram and one model's weights in memory besides model 0's): A and the
    right-hand side together, then one factorisation."""
    A = Bt = w0s = None
    sq = [0.0] * k
    for i in range(k):
        G = load_gram(i)
        d, device = G.size(0), G.device
        if A is None:
            A = scratch("A", (d, d), dtype, device).zero_()
        elif d != A.size(0):
            raise ValueError(f"Gram {i} has size {d}, Gram 0 {A.size(0)}")
        # model 0's term only grows A (its weights are the anchor), unless the term is built in A's dtype anyway
        keep = alpha != 0.0 and (i > 0 or dtype != torch.float32)
        out = scratch("S", (d, d), dtype, device) if keep else None
        S, stats = model_term(A, G, factors[i], alpha, out=out)
        check_gram(i, stats)  # before S is used: a bad Gram stops here, named
        del G
        ws, widths = load_weights(i, d, "W0" if i == 0 else "W")
        if i == 0:
            w0s = ws
            Bt = scratch("Bt", (sum(widths), d), dtype, device).zero_()
        else:
            sq[i] = add_delta_rhs(Bt, ws, w0s, S, scratch)
        del S, ws
    fac, shift, report = robust_factor_(symmetrize_upper_(A))
    report.tol = tol
    if fac is not None:
        _finish(report, dtype, sq, w0s)
    if shift is not None:  # toward the average: + diag(shift) sum_i c_i (W_i - W_0), the weights read again
        for i in range(1, k):
            ws, _ = load_weights(i, A.size(0), "W")
            add_delta_rhs(Bt, ws, w0s, shift * coeffs[i], scratch)
    if fac is None:
        Bt.copy_(_lstsq(A, Bt))
    else:
        fac.solve_(Bt)
    _add_anchor(Bt, w0s)
    return Bt, widths, report


def _solve_terms_first(k, load_gram, load_weights, factors, coeffs, alpha, check_gram, scratch, tol):
    """W* = W_0 + sum_{i>0} (W_i - W_0) M_i with M_i = (S_i + lambda c_i I) (A + lambda I)^-1: every Gram read
    (and checked) into A, A factored once, then per model i > 0 its S_i read again, solved against the factor
    (one d x d right-hand side) and multiplied. The same solution as the streaming one; None when A needs
    least squares."""
    A = None
    for i in range(k):
        G = load_gram(i)
        if A is None:
            A = scratch("A", (G.size(0), G.size(0)), torch.float32, G.device).zero_()
        check_gram(i, model_term(A, G, factors[i], alpha)[1])
        del G
    d, device = A.size(0), A.device
    fac, shift, report = robust_factor_(symmetrize_upper_(A))
    report.tol = tol
    if fac is None:
        return None
    w0s, widths = load_weights(0, d, "W0")
    Bt = scratch("Bt", (sum(widths), d), torch.float32, device).zero_()
    M = scratch("M", (d, d), torch.float32, device)
    sq = [0.0] * k
    for i in range(1, k):
        G = load_gram(i)
        check_gram(i, ops.gram_term(G, factors[i], alpha, None, M))  # read again: checked again
        del G
        if shift is not None:
            torch.diagonal(M).add_(shift * coeffs[i])
        fac.solve_(M)  # M <- M A^-1 (S_i symmetric: row-major M is its own transposed right-hand side)
        ws, _ = load_weights(i, d, "W")
        sq[i] = add_delta_rhs(Bt, ws, w0s, M, scratch)
        del ws
    _finish(report, torch.float32, sq, w0s)
    _add_anchor(Bt, w0s)
    return Bt, widths, report


def regmean_group(weights: Sequence[Sequence[torch.Tensor]], grams: Sequence[torch.Tensor], *,
                  alpha: float = 1.0, coeffs: Sequence[float] | None = None,
                  counts: Sequence[int] | None = None, normalization: str = "mean",
                  solve_dtype: torch.dtype = torch.float32,
                  tol: float | None = None) -> tuple[list[torch.Tensor], SolveReport]:
    """Merge every module of one shared-input group with one factorisation (solve_group, in memory).

    weights[m][i]: module m's weight in model i, oriented [d_out_m, d_in] (callers transpose
    transformers Conv1D weights). grams[i]: model i's raw symmetric Gram [d_in, d_in];
    counts[i]: its token count (needed for normalization="mean"); tol: as solve_group's. Returns the merged weights
    ([d_out_m, d_in] each, in the solve dtype, or float64 when the solve escalated) and what the solve needed.
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
    coeffs = normalized_coeffs(coeffs, k)
    factors = [c * s for c, s in zip(coeffs, gram_scales(counts, k, normalization))]
    device = grams[0].device

    def load_gram(i):
        return grams[i].to(device).contiguous()  # model_term takes any float dtype

    def load_weights(i, d, name):
        ws = [per_model[i].to(device) for per_model in weights]
        return ws, [w.size(0) for w in ws]

    Bt, widths, report = solve_group(k, load_gram, load_weights, factors, coeffs, alpha, solve_dtype, tol=tol)
    return list(torch.split(Bt, widths, dim=0)), report


def regmean_solve(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 1.0,
                  coeffs: Sequence[float] | None = None) -> torch.Tensor:
    """Merge one layer: K weights [d_out, d_in] and their already normalised Grams [d_in, d_in].

    Solved in float64 when any input is float64, else float32 (float64 when its expected error calls for
    it, at the tolerance of the weights' dtype: solve_tolerance); returned in the weights' dtype.
    """
    wide = torch.float64 if any(t.dtype == torch.float64 for t in [*weights, *grams]) else torch.float32
    merged, _ = regmean_group([list(weights)], list(grams), alpha=alpha, coeffs=coeffs, normalization="sum",
                              solve_dtype=wide, tol=solve_tolerance(weights[0].dtype))
    return merged[0].to(weights[0].dtype)
