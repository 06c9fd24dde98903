"""RegMean: per shared-input group, W*^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T, with
G~_i = c_i (alpha N(G_i) + (1 - alpha) diag(N(G_i))) (see docs/merge.md). Tensors without a Gram
(embeddings, norms, biases, excluded ones) are averaged with the same c_i.

The group is accumulated model by model (one Gram and one model's weights in memory at a time, besides
model 0's: the solve is written relative to them, see solve.solve_group) and solved with one factorisation
for all its modules (q/k/v, gate/up, fused qkv)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...solve import NORMALIZATIONS, gram_scales, solve_group
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
    tol: float | None = None  # the solve's tolerance (solve.solve_tolerance of the output dtype; None: PRECISION_TOL)


class RegMean(MergeMethod):
    name = "regmean"
    needs_stats = True
    negative_weights = False  # the weighted sum of Grams must stay positive semi-definite
    # alpha 0.9: level with 1.0 on the sentiment LMs of docs/quality.md, 1.5 points behind it on the digits MLP
    # (2 seeds), and below 1 the summed system is positive definite with a bounded scaled condition (see --help).
    params = {"alpha": 0.9, "normalization": "mean"}

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
        may be views of g.scratch buffers, valid until the next group (solve.solve_group: relative to model 0,
        escalated to fp64 when the fp32 solve's expected error is above g.tol)."""
        alpha = params["alpha"]
        counts = [g.count(i) for i in range(g.k)]
        factors = [c * s for c, s in zip(g.coeffs, gram_scales(counts, g.k, params["normalization"]))]

        def scratch(name, shape, dtype, device):
            if g.scratch is not None:
                return g.scratch(name, shape, dtype)
            return torch.empty(shape, dtype=dtype, device=device)

        widths = self._widths(g)
        # Wide groups (gate/up: 11264 output rows for d_in 1024) solve each model's d x d term instead of
        # the d x r right-hand side (r = sum(widths)): (K - 1) 2 d^3 flops in place of 2 d^2 r, both beside
        # the same (K - 1) 2 d^2 r of products, so it pays from r > (K - 1) d (q/k/v of 3 models: 3d > 2d).
        terms_first = (widths is not None and g.d_in is not None and sum(widths) > (g.k - 1) * g.d_in
                       and g.device is not None and torch.device(g.device).type == "cpu")

        def load_weights(i, d, name):
            return self._load_weights(g, i, d, scratch, name)

        Bt, widths, report = solve_group(g.k, g.load_gram, load_weights, factors, g.coeffs, alpha, solve_dtype,
                                         check_gram=g.check_gram, scratch=scratch, terms_first=terms_first,
                                         tol=g.tol)
        return self._outputs(g, Bt, widths), report

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
    def _load_weights(g: GroupInputs, i: int, d: int, scratch, name: str):
        """Model i's member weights, oriented [d_out, d_in], as the row blocks of Bt they multiply -> (blocks,
        member widths). Members stored [d_out, d_in] in one dtype are read straight into one stacked buffer
        (scratch `name`; model 0's, the anchor, stay in theirs while the others are read): one GEMM for
        q/k/v or gate/up (a 3x or 2x taller product runs nearer MKL's peak than three or two)."""
        n = len(g.members)
        if g.weight_shape is not None and g.weight_dtype is not None and not any(g.conv1d):
            shapes = [g.weight_shape(m) for m in range(n)]
            dtypes = {g.weight_dtype(i, m) for m in range(n)}
            for m, shp in enumerate(shapes):
                if len(shp) != 2 or shp[1] != d:
                    raise MergeError(f"{g.members[m]}: Gram of size {d} for inputs of size {shp[-1]}")
            if len(dtypes) == 1:
                widths = [shp[0] for shp in shapes]
                W = scratch(name, (sum(widths), d), dtypes.pop(), g.device)
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


class RegMeanPlusPlus(RegMean):
    """RegMean++ (Nguyen et al. 2025): RegMean's solve, with each block's Grams taken from the models' data
    passed through the already merged blocks before it; run block by block by merge/regmean_pp.py."""

    name = "regmean++"
    needs_stats = False
    needs_data = True
