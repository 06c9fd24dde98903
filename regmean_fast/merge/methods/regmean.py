"""RegMean: per shared-input group, W*^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T, with
G~_i = c_i (alpha N(G_i) + (1 - alpha) diag(N(G_i))) (see docs/merge.md). Tensors without a Gram
(embeddings, norms, biases, excluded ones) are averaged with the same c_i.

The group is accumulated model by model (one Gram and one model's weights in memory at a time) and
solved with one factorisation for all its modules (q/k/v, gate/up, fused qkv)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ... import ops
from ...solve import (EXACT_BF16_MIN_DIM, NORMALIZATIONS, add_rhs, gram_scales, model_term, robust_cholesky_,
                       robust_spd_solve_, symmetrize_upper_)
from ..errors import MergeError
from .base import MergeMethod, check_unit_interval, weighted_average


@dataclass
class GroupInputs:
    """One shared-input group: members are parameter names; conv1d[m] says member m is stored [in, out].

    load_weight(i, m) -> member m of model i as stored (its own dtype), on the device;
    load_gram(i) -> model i's raw fp32 Gram [d, d] on the device, contiguous, possibly not validated yet:
    check_gram(i, stats) raises on invalid ops.symmetry_stats; count(i) -> its tokens;
    scratch(name, shape, dtype) -> a reusable buffer (contents undefined) or None to allocate."""

    members: list
    conv1d: list
    k: int
    load_weight: Callable
    load_gram: Callable
    count: Callable
    coeffs: list
    check_gram: Callable = lambda i, stats: None
    scratch: Callable | None = None
    weight_dtype: Callable | None = None  # (i, m) -> member m's stored dtype in model i
    weight_shape: Callable | None = None  # m -> member m's stored shape
    d_in: int | None = None  # the Grams' size, when known up front
    device: object = None  # where load_gram puts the Grams, when known up front


class RegMean(MergeMethod):
    name = "regmean"
    needs_stats = True
    params = {"alpha": 1.0, "normalization": "mean"}

    def check_params(self, params):
        p = super().check_params(params)
        p["alpha"] = check_unit_interval("alpha", p["alpha"])
        if p["normalization"] not in NORMALIZATIONS:
            raise MergeError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {p['normalization']!r}")
        return p

    def merge(self, inputs, params):  # tensors without a Gram
        return weighted_average(inputs)

    def merge_group(self, g: GroupInputs, params: dict, solve_dtype: torch.dtype):
        """-> (merged members, each [d_out, d_in] or stored [in, out] for Conv1D; SolveReport). The outputs
        may be views of g.scratch buffers, valid until the next group."""
        alpha = params["alpha"]
        counts = [g.count(i) for i in range(g.k)]
        factors = [c * s for c, s in zip(g.coeffs, gram_scales(counts, g.k, params["normalization"]))]

        def buffer(name, shape, dtype, device):
            return g.scratch(name, shape, dtype) if g.scratch is not None else torch.empty(shape, dtype=dtype,
                                                                                             device=device)
        widths = self._widths(g)
        # Wide groups (gate/up: 11264 output rows for d_in 1024) solve each model's d x d term instead of
        # the d x sum(widths) right-hand side: K d^3 flops in place of d^2 sum(widths).
        if (solve_dtype == torch.float32 and alpha != 0.0 and widths is not None and g.d_in is not None
                and sum(widths) > g.k * g.d_in and g.device is not None and torch.device(g.device).type == "cpu"):
            res = self._solve_terms_then_multiply(g, factors, alpha, widths, buffer)
            if res is not None:
                return res
        A = Bt = None
        for i in range(g.k):
            G = g.load_gram(i)
            d = G.size(0)
            ws, widths = self._load_weights(g, i, d, buffer, G.device)
            if A is None:
                A = buffer("A", (d, d), solve_dtype, G.device).zero_()
                Bt = buffer("Bt", (sum(widths), d), solve_dtype, G.device).zero_()
            split = solve_dtype == torch.float32 and alpha != 0.0 and self._exact_bf16(ws, d, G.device)
            out = None
            if solve_dtype == torch.float32 and alpha != 0.0:
                out = buffer("S", (3, d, d) if split else (d, d), torch.bfloat16 if split else torch.float32, G.device)
            S, stats = model_term(A, G, factors[i], alpha, split=split, out=out)
            g.check_gram(i, stats)  # before S is used: a bad Gram stops here, named
            del G
            self._add_products(Bt, ws, S)
            del S, ws
        report = robust_spd_solve_(symmetrize_upper_(A), Bt)
        return self._outputs(g, Bt, widths), report

    def _solve_terms_then_multiply(self, g, factors, alpha, widths, buffer):
        """W*^T = sum_i W_i M_i with M_i = S_i A^-1: validate every Gram and accumulate A, factor A once,
        then per model solve its S_i (one d x d right-hand side) and add W_i M_i (exact bf16x3 products for
        bf16 weights). Same solution as sum_i W_i S_i then A^-1; None when A needs least squares (the caller
        then takes the usual path)."""
        d, device = g.d_in, g.device
        A = buffer("A", (d, d), torch.float32, device).zero_()
        for i in range(g.k):
            G = g.load_gram(i)
            if G.size(0) != d:
                return None
            g.check_gram(i, ops.gram_term(G, factors[i], alpha, A))
            del G
        report = robust_cholesky_(symmetrize_upper_(A))
        if report.method == "lstsq":
            return None
        Bt = buffer("Bt", (sum(widths), d), torch.float32, device).zero_()
        M = buffer("M", (d, d), torch.float32, device)
        for i in range(g.k):
            G = g.load_gram(i)
            g.check_gram(i, ops.gram_term(G, factors[i], alpha, None, M))  # read again: checked again
            del G
            ops.spd_solve_(A, M, factored=True)  # M <- S_i A^-1 (S_i symmetric: row-major S_i is its own B)
            ws, _ = self._load_weights(g, i, d, buffer, device)
            self._add_products(Bt, ws, ops.split_bf16x3(M) if self._exact_bf16(ws, d, device) else M)
            del ws
        return self._outputs(g, Bt, widths), report

    @staticmethod
    def _exact_bf16(ws, d, device) -> bool:
        """bf16 checkpoints: W M through exact bf16x3 products (fp32-accurate, AMX-fast)."""
        return (d >= EXACT_BF16_MIN_DIM and all(w.dtype == torch.bfloat16 for w in ws)
                and ops.exact_bf16_products_available(device))

    @staticmethod
    def _add_products(Bt, ws, S):
        """Each block's (transposed) right-hand side straight into its rows of Bt: every GEMM operand row-major."""
        off = 0
        for W in ws:
            add_rhs(Bt[off:off + W.size(0)], W, S)
            off += W.size(0)

    @staticmethod
    def _outputs(g, Bt, widths):
        outs, off = [], 0
        for m, w in enumerate(widths):
            part = Bt[off:off + w]
            outs.append(part.T.contiguous() if g.conv1d[m] else part)
            off += w
        return outs

    @staticmethod
    def _widths(g: GroupInputs):
        """The members' output widths (rows of Bt) when the shapes are known up front, else None."""
        if g.weight_shape is None:
            return None
        shapes = [g.weight_shape(m) for m in range(len(g.members))]
        if any(len(s) != 2 for s in shapes):
            return None
        return [s[1] if c else s[0] for s, c in zip(shapes, g.conv1d)]

    @staticmethod
    def _load_weights(g: GroupInputs, i: int, d: int, buffer, device):
        """Model i's member weights, oriented [d_out, d_in], as the row blocks of Bt they multiply -> (blocks,
        member widths). Members stored [d_out, d_in] in one dtype are read straight into one stacked buffer:
        one GEMM for q/k/v or gate/up (a 3x or 2x taller product runs nearer MKL's peak than three or two)."""
        n = len(g.members)
        if g.weight_shape is not None and g.weight_dtype is not None and not any(g.conv1d):
            shapes = [g.weight_shape(m) for m in range(n)]
            dtypes = {g.weight_dtype(i, m) for m in range(n)}
            for m, shp in enumerate(shapes):
                if len(shp) != 2 or shp[1] != d:
                    raise MergeError(f"{g.members[m]}: Gram of size {d} for inputs of size {shp[-1]}")
            if len(dtypes) == 1:
                widths = [shp[0] for shp in shapes]
                W = buffer("W", (sum(widths), d), dtypes.pop(), device)
                off = 0
                for m, w in enumerate(widths):
                    g.load_weight(i, m, out=W[off:off + w])
                    off += w
                return [W], widths
        ws = []
        for m in range(n):
            w = g.load_weight(i, m)  # as stored
            ws.append(w.T if g.conv1d[m] else w)  # oriented [d_out, d_in]
            if ws[-1].size(1) != d:
                raise MergeError(f"{g.members[m]}: Gram of size {d} for inputs of size {ws[-1].size(1)}")
        return ws, [w.size(0) for w in ws]
