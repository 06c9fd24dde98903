"""Pure-PyTorch RegMean: the correctness oracle and the benchmark baseline.

Nothing here is fast on purpose; everything here is simple enough to trust by reading.
"""

from __future__ import annotations

import torch


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
