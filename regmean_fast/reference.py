"""Pure-PyTorch RegMean: the correctness oracle and the benchmark baseline.

Nothing here is fast on purpose; everything here is simple enough to trust by reading. This module
does not use the fast path (regmean_fast.solve) so that each can be checked against the other.

The method, for one linear layer and K models (see docs/design.md):

    G_i   = sum over kept (non-padding) rows x of model i's inputs of x x^T,   n_i = number of rows
    N(G)  = G / n_i ("mean", the published codes' choice) or G ("sum")
    G~_i  = c_i * (alpha * N(G_i) + (1 - alpha) * diag(N(G_i)))          c_i >= 0, sum_i c_i = 1
    W*^T  = (sum_i G~_i)^-1  sum_i G~_i W_i^T

Every other parameter is the weighted average sum_i c_i p_i.

Public functions:

    kept_rows(X, mask=None) -> [n, d]
    gram_update(G, X, mask=None)                      # fp32, upper triangle only (the ops' fallback)
    symmetrize_(G)
    gram_from_activations(X, mask=None) -> (G, count)
    normalize_gram(G, count, normalization="mean")
    regularize_gram(G, alpha)
    normalize_coeffs(coeffs, k) -> list[float]
    robust_solve(A, B) -> (X, {"method", "ridge"})
    regmean_solve(weights, grams, alpha=1.0, coeffs=None, counts=None, normalization="mean") -> W
    regmean_solve_with_report(...same...) -> (W, report)
    regmean_solve_group(module_weights, grams, ...same...) -> ([W per module], report)
    merge_state_dicts(state_dicts, grams, counts=None, *, alpha, coeffs, normalization, conv1d, groups,
                      exclude) -> (merged_state_dict, report)

Dtypes: the solve runs in float64 when any input (weight or Gram) is float64, in float32 otherwise
(bf16/fp16 inputs are computed in fp32); results are returned in the weights' dtype.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, Sequence

import torch

NORMALIZATIONS = ("mean", "sum")
RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def kept_rows(X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """X [..., d] -> the [n, d] rows whose mask is True (all rows without a mask)."""
    rows = X.reshape(-1, X.size(-1))
    if mask is None:
        return rows
    return rows[mask.expand(X.shape[:-1]).reshape(-1)]


def gram_update(G: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """triu(G) += triu(R^T R) for the kept rows R, in fp32; the strict lower triangle is untouched."""
    R = kept_rows(X, mask).to(torch.float32)
    G.add_(torch.triu(R.T @ R))
    return G


def symmetrize_(G: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle of G into the lower one, in place."""
    upper = torch.triu(G)
    G.copy_(upper + torch.triu(G, diagonal=1).T)
    return G


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gram_from_activations(X: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The raw Gram sum_x x x^T over the kept rows of X [..., d], full and symmetric, and the row count.

    Accumulated in fp32 (fp64 when X is fp64). mask: bool, broadcastable to X.shape[:-1]; rows where
    it is False (padding) are skipped.
    """
    if X.dim() < 1:
        raise ValueError("X must have at least one dimension (the features)")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    R = kept_rows(X, mask).to(_compute_dtype(X))
    G = R.T @ R
    G = (G + G.T) / 2  # exactly symmetric whatever order the matmul summed in
    return G, int(R.size(0))


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= a <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return a


def normalize_gram(G: torch.Tensor, count: int, normalization: str = "mean") -> torch.Tensor:
    """N(G): G / count for "mean" (the per-token mean Gram), G unchanged for "sum"."""
    _check_normalization(normalization)
    if normalization == "sum":
        return G
    if int(count) <= 0:
        raise ValueError(f"normalization 'mean' needs a positive token count, got {count}")
    return G / int(count)


def regularize_gram(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G): off-diagonal entries scaled by alpha, diagonal kept."""
    alpha = _check_alpha(alpha)
    return alpha * G + (1.0 - alpha) * torch.diag(torch.diagonal(G))


def normalize_coeffs(coeffs: Sequence[float] | None, k: int) -> list[float]:
    """Model weights c_i: validated (non-negative, finite, not all zero) and scaled to sum to 1.

    None means equal weights 1/k.
    """
    if k < 1:
        raise ValueError("no models to merge")
    if coeffs is None:
        return [1.0 / k] * k
    c = [float(x) for x in coeffs]
    if len(c) != k:
        raise ValueError(f"got {len(c)} coefficients for {k} models")
    if any(not math.isfinite(x) or x < 0 for x in c):
        raise ValueError(f"coefficients must be finite and non-negative, got {c}")
    total = sum(c)
    if total <= 0:
        raise ValueError(f"coefficients must not all be zero, got {c}")
    return [x / total for x in c]


# ----------------------------------------------------------------------------------------------
# The solve
# ----------------------------------------------------------------------------------------------


def _cholesky_ok(A: torch.Tensor) -> torch.Tensor | None:
    """The Cholesky factor of A, or None when it failed (info > 0 or a non-finite factor)."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0 and bool(torch.isfinite(L).all()):
        return L
    return None


def robust_solve(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Solve A X = B for a symmetric positive (semi-)definite A [d, d] and B [d, m].

    1. Cholesky.
    2. On failure: Cholesky of A + lambda * mean(diag(A)) * I, lambda = 1e-6, 1e-5, ..., 1e-1.
    3. On failure: least squares (torch.linalg.lstsq, fp64, on the CPU; minimum-norm solution).
    Returns X (A's dtype and device) and {"method": "cholesky"|"cholesky+ridge"|"lstsq", "ridge": lambda}.
    """
    if A.dim() != 2 or A.size(0) != A.size(1):
        raise ValueError(f"A must be a square matrix, got shape {tuple(A.shape)}")
    if B.dim() != 2 or B.size(0) != A.size(0):
        raise ValueError(f"B must be [{A.size(0)}, m], got shape {tuple(B.shape)}")
    if not bool(torch.isfinite(A).all()) or not bool(torch.isfinite(B).all()):
        raise ValueError("non-finite values in the system to solve")

    L = _cholesky_ok(A)
    if L is not None:
        return torch.cholesky_solve(B, L), {"method": "cholesky", "ridge": 0.0}

    scale = float(torch.diagonal(A).mean())
    eye = torch.eye(A.size(0), dtype=A.dtype, device=A.device)
    for lam in RIDGES:
        L = _cholesky_ok(A + (lam * scale) * eye)
        if L is not None:
            return torch.cholesky_solve(B, L), {"method": "cholesky+ridge", "ridge": lam}

    X = torch.linalg.lstsq(A.double().cpu(), B.double().cpu(), driver="gelsd").solution
    return X.to(dtype=A.dtype, device=A.device), {"method": "lstsq", "ridge": 0.0}


def regmean_solve_group(
    module_weights: Sequence[Sequence[torch.Tensor]],
    grams: Sequence[torch.Tensor],
    alpha: float = 1.0,
    coeffs: Sequence[float] | None = None,
    counts: Sequence[int] | None = None,
    normalization: str = "mean",
) -> tuple[list[torch.Tensor], dict]:
    """RegMean for the modules that read one shared input (e.g. q/k/v): one system, all right-hand sides.

    module_weights[m][i]: module m's weight in model i, [d_out_m, d_in]. grams[i]: model i's Gram
    [d_in, d_in]: raw when counts are given (counts[i] = its row count), already normalised when
    counts is None. Returns the merged weights (one per module, in the weights' dtype) and the
    solve report {"method", "ridge"}.
    """
    alpha = _check_alpha(alpha)
    _check_normalization(normalization)
    k = len(grams)
    c = normalize_coeffs(coeffs, k)
    if len(module_weights) == 0:
        raise ValueError("no weights to merge")
    d = grams[0].size(0) if grams[0].dim() == 2 else -1
    for i, G in enumerate(grams):
        if G.dim() != 2 or G.shape != (d, d):
            raise ValueError(f"Gram {i} has shape {tuple(G.shape)}, expected a square matrix like Gram 0 ({d}, {d})")
        if not bool(torch.isfinite(G).all()):
            raise ValueError(f"Gram {i} has non-finite values")
    for m, per_model in enumerate(module_weights):
        if len(per_model) != k:
            raise ValueError(f"module {m}: got {len(per_model)} weights for {k} Grams")
        for i, W in enumerate(per_model):
            if W.dim() != 2 or W.shape != per_model[0].shape:
                raise ValueError(
                    f"module {m}, model {i}: weight shape {tuple(W.shape)} differs from model 0's "
                    f"{tuple(per_model[0].shape)} or is not a matrix"
                )
            if W.size(1) != d:
                raise ValueError(f"module {m}, model {i}: weight shape {tuple(W.shape)} does not take inputs of size {d}")
    if counts is not None:
        if len(counts) != k:
            raise ValueError(f"got {len(counts)} token counts for {k} models")
        if normalization == "mean" and any(int(n) <= 0 for n in counts):
            raise ValueError(f"token counts must be positive for normalization 'mean', got {list(counts)}")

    dtype = _compute_dtype(*grams, *(W for per_model in module_weights for W in per_model))
    A = torch.zeros(d, d, dtype=dtype, device=grams[0].device)
    widths = [per_model[0].size(0) for per_model in module_weights]
    B = torch.zeros(d, sum(widths), dtype=dtype, device=grams[0].device)
    for i in range(k):
        G = grams[i].to(dtype)
        if counts is not None:
            G = normalize_gram(G, counts[i], normalization)
        Gt = c[i] * regularize_gram(G, alpha)
        Wt = torch.cat([per_model[i].to(device=G.device, dtype=dtype) for per_model in module_weights], dim=0).T
        A = A + Gt
        B = B + Gt @ Wt
    X, report = robust_solve(A, B)
    merged = [part.T.to(module_weights[m][0].dtype).contiguous() for m, part in enumerate(torch.split(X, widths, dim=1))]
    return merged, report


def regmean_solve_with_report(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    alpha: float = 1.0,
    coeffs: Sequence[float] | None = None,
    counts: Sequence[int] | None = None,
    normalization: str = "mean",
) -> tuple[torch.Tensor, dict]:
    """One layer: K weights [d_out, d_in] and their K Grams [d_in, d_in] -> (merged weight, solve report).

    With counts, the Grams are raw sums normalised by `normalization`; without, they are taken as
    already normalised.
    """
    if len(weights) != len(grams):
        raise ValueError(f"got {len(weights)} weights and {len(grams)} Grams")
    merged, report = regmean_solve_group([list(weights)], list(grams), alpha, coeffs, counts, normalization)
    return merged[0], report


def regmean_solve(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    alpha: float = 1.0,
    coeffs: Sequence[float] | None = None,
    counts: Sequence[int] | None = None,
    normalization: str = "mean",
) -> torch.Tensor:
    """One layer, the merged weight only (see regmean_solve_with_report)."""
    return regmean_solve_with_report(weights, grams, alpha, coeffs, counts, normalization)[0]


# ----------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------


def _validate_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    if len(state_dicts) == 0:
        raise ValueError("no models to merge")
    names = list(state_dicts[0].keys())
    first = set(names)
    for i, sd in enumerate(state_dicts[1:], start=1):
        keys = set(sd.keys())
        if keys != first:
            missing, extra = sorted(first - keys), sorted(keys - first)
            raise ValueError(f"model {i} has different parameters than model 0: missing {missing[:5]}, extra {extra[:5]}")
        for name in names:
            if sd[name].shape != state_dicts[0][name].shape:
                raise ValueError(
                    f"{name}: shape {tuple(sd[name].shape)} in model {i} differs from "
                    f"{tuple(state_dicts[0][name].shape)} in model 0"
                )
    return names


def _weighted_average(tensors: Sequence[torch.Tensor], c: Sequence[float]) -> torch.Tensor:
    dtype = _compute_dtype(*tensors)
    out = torch.zeros_like(tensors[0], dtype=dtype)
    for t, ci in zip(tensors, c):
        out = out + ci * t.to(dtype)
    return out.to(tensors[0].dtype)


def merge_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    grams: Mapping[str, Sequence[torch.Tensor]],
    counts: Mapping[str, Sequence[int]] | None = None,
    *,
    alpha: float = 1.0,
    coeffs: Sequence[float] | None = None,
    normalization: str = "mean",
    conv1d: Iterable[str] = (),
    groups: Mapping[str, Sequence[str]] | None = None,
    exclude: Iterable[str] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Merge K models' state dicts with RegMean (the "FusionBench-style" way, everything in memory).

    state_dicts: K dicts parameter name -> tensor, same keys and shapes.
    grams: module name -> K Grams [d_in, d_in], one per model (raw sums when counts are given,
        already normalised when counts is None). Module m's parameter "{m}.weight" must exist.
    counts: module name -> K token counts (None: the Grams are already normalised).
    conv1d: module names whose weight is stored [in, out] (transformers Conv1D); transposed to
        [out, in] for the solve and back after.
    groups: group key -> module names that read the same input (q/k/v, gate/up). Grams stay keyed
        by module: every member must have its own entry in `grams` (and `counts`), and the members'
        Grams must be the same (the same tensor objects, as a Gram file maps several modules to one
        Gram, or equal values). A group is solved once with the members' weights as concatenated
        right-hand sides. A module may belong to one group at most.
    exclude: regular expressions (re.search) on parameter names; a matching parameter is simply
        (weighted-)averaged, even if it has a Gram.

    Every "{module}.weight" with a Gram -> RegMean; every other floating-point parameter ->
    sum_i c_i p_i with the same normalised c_i; non-floating tensors (integer buffers) must be equal
    across models and are copied. Output tensors keep model 0's dtypes.

    Returns (merged state dict, report): report[name] = {"method": "regmean", "group": key or None,
    "solve": {"method": ..., "ridge": ...}}, {"method": "average"} or {"method": "copy"}.
    """
    alpha = _check_alpha(alpha)
    _check_normalization(normalization)
    names = _validate_state_dicts(state_dicts)
    k = len(state_dicts)
    c = normalize_coeffs(coeffs, k)
    conv1d = set(conv1d)
    exclude_res = [re.compile(p) for p in exclude]
    _check_grams(grams, counts, conv1d, set(names), k)
    units = _solve_units(grams, counts, groups, k)
    merged: dict[str, torch.Tensor] = {}
    report: dict[str, dict] = {}
    for key, members in units:
        members = [m for m in members if not any(r.search(f"{m}.weight") for r in exclude_res)]
        if members:
            _merge_unit(key, members, state_dicts, grams, counts, conv1d, alpha, c, normalization, merged, report)
    _average_the_rest(names, state_dicts, c, merged, report)
    return {name: merged[name] for name in names}, report


def _check_grams(grams, counts, conv1d: set, name_set: set, k: int) -> None:
    for module, per_model in grams.items():
        if f"{module}.weight" not in name_set:
            raise ValueError(f"Gram for module {module!r} but no parameter {module + '.weight'!r} in the models")
        if len(per_model) != k:
            raise ValueError(f"module {module!r}: got {len(per_model)} Grams for {k} models")
        if counts is not None:
            if module not in counts:
                raise ValueError(f"module {module!r} has Grams but no token counts")
            if len(counts[module]) != k:
                raise ValueError(f"module {module!r}: got {len(counts[module])} token counts for {k} models")
    for module in conv1d:
        if f"{module}.weight" not in name_set:
            raise ValueError(f"conv1d module {module!r} has no parameter {module + '.weight'!r} in the models")


def _solve_units(grams, counts, groups, k: int) -> list[tuple[str | None, list[str]]]:
    """The solve units: (group key or None, member modules), each with one shared Gram."""
    units: list[tuple[str | None, list[str]]] = []
    grouped: set[str] = set()
    for key, members in (groups or {}).items():
        members = list(members)
        if not members:
            raise ValueError(f"group {key!r} is empty")
        for module in members:
            if module in grouped:
                raise ValueError(f"module {module!r} is in more than one group (or twice in group {key!r})")
            if module not in grams:
                raise ValueError(f"group {key!r}: module {module!r} has no Grams")
            grouped.add(module)
            for i in range(k):
                a, b = grams[members[0]][i], grams[module][i]
                if a is not b and (a.shape != b.shape or not torch.equal(a, b)):
                    raise ValueError(f"group {key!r}: module {module!r} has a different Gram than {members[0]!r} (model {i})")
                if counts is not None and int(counts[members[0]][i]) != int(counts[module][i]):
                    raise ValueError(f"group {key!r}: module {module!r} has a different token count than {members[0]!r} (model {i})")
        units.append((key, members))
    units += [(None, [module]) for module in grams if module not in grouped]
    return units


def _merge_unit(key, members, state_dicts, grams, counts, conv1d, alpha, c, normalization, merged, report) -> None:
    """One solve unit's weights by RegMean into merged / report."""
    module_weights = []
    for module in members:
        ws = [sd[f"{module}.weight"] for sd in state_dicts]
        if ws[0].dim() != 2:
            raise ValueError(f"{module}.weight has shape {tuple(ws[0].shape)}; RegMean needs a matrix")
        module_weights.append([w.T if module in conv1d else w for w in ws])
    try:
        solved, solve_report = regmean_solve_group(
            module_weights,
            list(grams[members[0]]),
            alpha,
            c,
            None if counts is None else list(counts[members[0]]),
            normalization,
        )
    except ValueError as exc:
        raise ValueError(f"{key if key is not None else members[0]}: {exc}") from None
    for module, w in zip(members, solved):
        name = f"{module}.weight"
        out = w.T if module in conv1d else w
        merged[name] = out.contiguous().to(state_dicts[0][name].dtype)
        report[name] = {"method": "regmean", "group": key, "solve": dict(solve_report)}


def _average_the_rest(names, state_dicts, c, merged, report) -> None:
    """Every parameter RegMean did not merge: floating ones averaged, the others equal across models, copied."""
    for name in names:
        if name in merged:
            continue
        tensors = [sd[name] for sd in state_dicts]
        if tensors[0].is_floating_point():
            merged[name] = _weighted_average(tensors, c)
            report[name] = {"method": "average"}
        else:
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise ValueError(f"{name}: non-floating tensor differs across models and cannot be averaged")
            merged[name] = tensors[0].clone()
            report[name] = {"method": "copy"}
