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
from ...solve import EXACT_BF16_MIN_DIM, NORMALIZATIONS, add_rhs, gram_scales, model_term, robust_spd_solve_
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
        A = Bt = None
        widths = None
        for i in range(g.k):
            G = g.load_gram(i)
            d = G.size(0)
            ws = []
            for m in range(len(g.members)):
                w = g.load_weight(i, m)  # as stored
                ws.append(w.T if g.conv1d[m] else w)  # oriented [d_out, d_in]
                if ws[-1].size(1) != d:
                    raise MergeError(f"{g.members[m]}: Gram of size {d} for inputs of size {ws[-1].size(1)}")
            if widths is None:
                widths = [w.size(0) for w in ws]
                A = buffer("A", (d, d), solve_dtype, G.device).zero_()
                Bt = buffer("Bt", (sum(widths), d), solve_dtype, G.device).zero_()
            # bf16 checkpoints: W S through exact bf16x3 products (fp32-accurate, AMX-fast).
            split = (solve_dtype == torch.float32 and d >= EXACT_BF16_MIN_DIM and alpha != 0.0
                     and all(w.dtype == torch.bfloat16 for w in ws) and ops.exact_bf16_products_available(G.device))
            out = None
            if solve_dtype == torch.float32 and alpha != 0.0:
                out = buffer("S", (3, d, d) if split else (d, d), torch.bfloat16 if split else torch.float32, G.device)
            S, stats = model_term(A, G, factors[i], alpha, split=split, out=out)
            g.check_gram(i, stats)  # before S is used: a bad Gram stops here, named
            del G
            # Each member's (transposed) right-hand side goes straight into its rows of Bt: no
            # concatenated copy, every GEMM operand row-major.
            off = 0
            for m, W in enumerate(ws):
                add_rhs(Bt[off:off + widths[m]], W, S)
                off += widths[m]
            del S, ws
        report = robust_spd_solve_(A, Bt)
        outs = []
        for m, part in enumerate(torch.split(Bt, widths, dim=0)):
            outs.append(part.T.contiguous() if g.conv1d[m] else part)
        return outs, report
