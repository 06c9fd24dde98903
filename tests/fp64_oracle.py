"""The independent RegMean check of docs/design.md: least squares on raw activations, no Gram formed.

The merged W minimises

    sum_i c_i [ alpha ||s_i X_i (W - W_i)^T||^2 + (1 - alpha) ||D_i^(1/2) (W - W_i)^T||^2 ]

with s_i = 1/sqrt(n_i) for "mean" (1 for "sum") and D_i = diag(N(G_i)), computed here as the column sums
of squares of s_i X_i. So W^T is the least-squares solution of the stacked system whose blocks are, per
model, the rows sqrt(c_i alpha) s_i X_i and sqrt(c_i (1 - alpha)) D_i^(1/2), each with right-hand side
(those rows) W_i^T. Everything is fp64, solved with torch.linalg.lstsq (gelsd: minimum norm when rank
deficient). Nothing here imports regmean_fast.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def lstsq_merge(
    Xs: Sequence[torch.Tensor],
    Ws: Sequence[torch.Tensor],
    alpha: float = 1.0,
    coeffs: Sequence[float] | None = None,
    normalization: str = "mean",
    ridge: float = 0.0,
) -> torch.Tensor:
    """Xs[i]: model i's kept input rows [n_i, d_in] (or [..., d_in]); Ws[i]: its weight [d_out, d_in].
    ridge: the ridge toward the average, a number lambda or a vector (one lambda_j per input dimension): also
    minimise sum_j lambda_j ||(W - W_avg)[:, j]||^2 (W_avg = sum_i c_i W_i), i.e. the rows diag(sqrt(lambda))
    with right-hand side diag(sqrt(lambda)) W_avg^T.

    Returns the merged weight [d_out, d_in], fp64, on the CPU.
    """
    assert len(Xs) == len(Ws) > 0
    assert normalization in ("mean", "sum")
    k = len(Xs)
    c = [1.0] * k if coeffs is None else [float(x) for x in coeffs]
    total = sum(c)
    c = [x / total for x in c]
    rows, rhs = [], []
    for X, W, ci in zip(Xs, Ws, c):
        X = X.detach().reshape(-1, X.size(-1)).to("cpu", torch.float64)
        Wt = W.detach().to("cpu", torch.float64).T  # [d_in, d_out]
        s = 1.0 / math.sqrt(X.size(0)) if normalization == "mean" else 1.0
        if alpha > 0:
            block = math.sqrt(ci * alpha) * s * X
            rows.append(block)
            rhs.append(block @ Wt)
        if alpha < 1:
            d_sqrt = (s * X).pow(2).sum(dim=0).sqrt()  # sqrt of diag(N(G_i)), without forming G_i
            block = math.sqrt(ci * (1 - alpha)) * torch.diag(d_sqrt)
            rows.append(block)
            rhs.append(block @ Wt)
    lam = torch.as_tensor(ridge, dtype=torch.float64).expand(rows[0].size(1))
    if bool((lam > 0).any()):
        avg = sum(ci * W.detach().to("cpu", torch.float64) for W, ci in zip(Ws, c))
        block = torch.diag(lam.sqrt())
        rows.append(block)
        rhs.append(block @ avg.T)
    M, R = torch.cat(rows), torch.cat(rhs)
    return torch.linalg.lstsq(M, R, driver="gelsd").solution.T.contiguous()


def gram_merge(grams: Sequence[torch.Tensor], Ws: Sequence[torch.Tensor], alpha: float = 1.0,
               coeffs: Sequence[float] | None = None) -> torch.Tensor:
    """The closed form on given (already normalised) Grams, in fp64: (sum_i G~_i)^-1 sum_i G~_i W_i^T with
    G~_i = c_i (alpha G_i + (1 - alpha) diag(G_i)); for Grams as stored (fp32), whose rounding the activations'
    least squares would not see. Returns [d_out, d_in], fp64."""
    k = len(grams)
    c = [1.0 / k] * k if coeffs is None else [float(x) / sum(coeffs) for x in coeffs]
    A = B = 0
    for G, W, ci in zip(grams, Ws, c):
        G = G.detach().to("cpu", torch.float64)
        S = ci * (alpha * G + (1 - alpha) * torch.diag(torch.diagonal(G)))
        A = A + S
        B = B + S @ W.detach().to("cpu", torch.float64).T
    return torch.linalg.solve(A, B).T.contiguous()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F, in fp64."""
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def random_activations(
    ns: Sequence[int], d: int, *, dtype: torch.dtype = torch.float64, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """One [n_i, d] activation matrix per model, with a shared correlated structure and a per-model shift
    (so the Grams are well conditioned but differ between models)."""
    mix = torch.randn(d, d, dtype=torch.float64, generator=generator) / math.sqrt(d) + torch.eye(d, dtype=torch.float64)
    out = []
    for n in ns:
        shift = torch.randn(d, dtype=torch.float64, generator=generator)
        scale = torch.rand(d, dtype=torch.float64, generator=generator) + 0.5
        X = (torch.randn(n, d, dtype=torch.float64, generator=generator) * scale) @ mix + shift
        out.append(X.to(dtype))
    return out


def random_weights(
    k: int, d_out: int, d_in: int, *, spread: float = 0.5, dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """K weights [d_out, d_in]: a common base plus per-model perturbations of relative size `spread`."""
    base = torch.randn(d_out, d_in, dtype=torch.float64, generator=generator)
    return [(base + spread * torch.randn(d_out, d_in, dtype=torch.float64, generator=generator)).to(dtype) for _ in range(k)]
