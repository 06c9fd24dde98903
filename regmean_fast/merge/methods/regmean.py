"""RegMean: per shared-input group, W*^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T, with
G~_i = c_i (alpha N(G_i) + (1 - alpha) diag(N(G_i))) (see docs/merge.md). Tensors without a Gram
(embeddings, norms, biases, excluded ones) are averaged with the same c_i.

The group is accumulated model by model (one Gram and one model's weights in memory at a time) and
solved with one factorisation for all its modules (q/k/v, gate/up, fused qkv)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...solve import NORMALIZATIONS, add_model_term, gram_scales, robust_spd_solve
from ..errors import MergeError
from .base import MergeMethod, check_unit_interval, weighted_average


@dataclass
class GroupInputs:
    """One shared-input group: members are parameter names; conv1d[m] says member m is stored [in, out].

    load_weight(i, m) -> stored tensor of member m in model i (compute dtype, device);
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
        A = B = None
        widths = None
        for i in range(g.k):
            G = g.load_gram(i).to(solve_dtype)
            ws = []
            for m in range(len(g.members)):
                w = g.load_weight(i, m).to(solve_dtype)
                ws.append(w if g.conv1d[m] else w.T)  # oriented [d_in, d_out]
            Wt = torch.cat(ws, dim=1) if len(ws) > 1 else ws[0]
            if widths is None:
                widths = [w.size(1) for w in ws]
                A = torch.zeros_like(G)
                B = torch.zeros(G.size(0), Wt.size(1), dtype=solve_dtype, device=G.device)
            if Wt.size(0) != G.size(0):
                raise MergeError(f"{g.members[0]}: Gram of size {G.size(0)} for inputs of size {Wt.size(0)}")
            add_model_term(A, B, G, Wt, factors[i], alpha)
            del G, ws, Wt
        X, report = robust_spd_solve(A, B)
        outs = []
        for m, part in enumerate(torch.split(X, widths, dim=1)):
            outs.append(part.contiguous() if g.conv1d[m] else part.T.contiguous())
        return outs, report
