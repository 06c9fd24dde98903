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
from ...solve import EXACT_BF16_MIN_DIM, NORMALIZATIONS, add_model_term, gram_scales, robust_spd_solve
from ..errors import MergeError
from .base import MergeMethod, check_unit_interval, weighted_average


@dataclass
class GroupInputs:
    """One shared-input group: members are parameter names; conv1d[m] says member m is stored [in, out].

    load_weight(i, m) -> member m of model i as stored (its own dtype), on the device;
    load_gram(i) -> model i's raw fp32 Gram [d, d] on the device (validated); count(i) -> its tokens."""

    members: list
    conv1d: list
    k: int
    load_weight: Callable
    load_gram: Callable
    count: Callable
    coeffs: list


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
        alpha = params["alpha"]
        counts = [g.count(i) for i in range(g.k)]
        factors = [c * s for c, s in zip(g.coeffs, gram_scales(counts, g.k, params["normalization"]))]
        A = Bt = None
        widths = None
        for i in range(g.k):
            G = g.load_gram(i).to(solve_dtype)
            # bf16 checkpoints: W G through exact bf16x3 products (fp32-accurate, AMX-fast), G split once.
            fast = (solve_dtype == torch.float32 and G.size(0) >= EXACT_BF16_MIN_DIM
                    and ops.exact_bf16_products_available(G.device))
            G_split = None
            ws = []
            for m in range(len(g.members)):
                w = g.load_weight(i, m)  # as stored
                if fast and w.dtype == torch.bfloat16:
                    if G_split is None:
                        G_split = ops.split_bf16x3(G)
                else:
                    w = w.to(solve_dtype)
                ws.append(w.T if g.conv1d[m] else w)  # oriented [d_out, d_in]
                if ws[-1].size(1) != G.size(0):
                    raise MergeError(f"{g.members[m]}: Gram of size {G.size(0)} for inputs of size {ws[-1].size(1)}")
            if widths is None:
                widths = [w.size(0) for w in ws]
                A = torch.zeros_like(G)
                Bt = torch.zeros(sum(widths), G.size(0), dtype=solve_dtype, device=G.device)
            # Each member's (transposed) right-hand side goes straight into its rows of Bt: no
            # concatenated copy, every GEMM operand row-major; A is accumulated once per model.
            off = 0
            for m, W in enumerate(ws):
                add_model_term(A if m == 0 else None, Bt[off:off + widths[m]], G, W, factors[i], alpha, G_split)
                off += widths[m]
            del G, G_split, ws
        X, report = robust_spd_solve(A, Bt.T)
        outs = []
        for m, part in enumerate(torch.split(X.T, widths, dim=0)):
            outs.append(part.T.contiguous() if g.conv1d[m] else part.contiguous())
        return outs, report
