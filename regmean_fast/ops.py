"""The fast ops' Python face.

Each op is a registered PyTorch operator, reachable as ``torch.ops.regmean_fast.<name>`` (so other
libraries can call it and torch.compile can trace it: fake implementations are registered here) and
as a plain function in this module. The compiled extension provides CPU and CUDA kernels; without
it the same operators are registered from the pure-PyTorch reference.
"""

from __future__ import annotations

import torch

from . import _ext, reference

GRAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_SCHEMAS = {
    "gram_update": "gram_update(Tensor(a!) G, Tensor X, Tensor? mask=None) -> ()",
    "symmetrize_": "symmetrize_(Tensor(a!) G) -> ()",
}


def check_gram_update_args(G: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None) -> None:
    """The argument contract of gram_update (the C++ op checks the same, with the same words)."""
    if G.dtype != torch.float32:
        raise TypeError(f"gram_update: G must be float32, got {G.dtype}")
    if G.dim() != 2 or G.size(0) != G.size(1):
        raise ValueError(f"gram_update: G must be a square matrix, got shape {tuple(G.shape)}")
    if not G.is_contiguous():
        raise ValueError("gram_update: G must be contiguous")
    if X.dtype not in GRAM_DTYPES:
        raise TypeError(f"gram_update: X must be float32, bfloat16 or float16, got {X.dtype}")
    if X.dim() < 1 or X.size(-1) != G.size(0):
        raise ValueError(
            f"gram_update: X's last dimension must equal G's size {G.size(0)}, got shape {tuple(X.shape)}"
        )
    if X.device != G.device:
        raise ValueError(f"gram_update: G and X must be on the same device, got {G.device} and {X.device}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"gram_update: mask must be bool, got {mask.dtype}")
        if mask.device != X.device:
            raise ValueError(f"gram_update: mask must be on X's device {X.device}, got {mask.device}")
        try:
            torch.broadcast_shapes(mask.shape, X.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"gram_update: mask of shape {tuple(mask.shape)} does not broadcast to X's rows "
                f"{tuple(X.shape[:-1])}"
            ) from None


def check_symmetrize_args(G: torch.Tensor) -> None:
    if G.dtype != torch.float32:
        raise TypeError(f"symmetrize_: G must be float32, got {G.dtype}")
    if G.dim() != 2 or G.size(0) != G.size(1):
        raise ValueError(f"symmetrize_: G must be a square matrix, got shape {tuple(G.shape)}")
    if not G.is_contiguous():
        raise ValueError("symmetrize_: G must be contiguous")


if not _ext.HAVE_EXTENSION:
    # Same operators, pure-PyTorch bodies: callers never need to know which one they got.
    _fallback_lib = torch.library.Library("regmean_fast", "DEF")
    for _schema in _SCHEMAS.values():
        _fallback_lib.define(_schema)

    def _gram_update_fallback(G, X, mask=None):
        check_gram_update_args(G, X, mask)
        reference.gram_update(G, X, mask)

    def _symmetrize_fallback(G):
        check_symmetrize_args(G)
        reference.symmetrize_(G)

    _fallback_lib.impl("gram_update", _gram_update_fallback, "CompositeExplicitAutograd")
    _fallback_lib.impl("symmetrize_", _symmetrize_fallback, "CompositeExplicitAutograd")


@torch.library.register_fake("regmean_fast::gram_update")
def _gram_update_fake(G, X, mask=None):
    check_gram_update_args(G, X, mask)


@torch.library.register_fake("regmean_fast::symmetrize_")
def _symmetrize_fake(G):
    check_symmetrize_args(G)


def gram_update(G: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """In place: ``triu(G) += triu(X[mask]^T X[mask])``, accumulated in fp32.

    G: float32 [d, d], contiguous; only its upper triangle (diagonal included) is read and written,
    the strict lower triangle is left as it was (``symmetrize_`` fills it).
    X: [..., d] in bfloat16, float16 or float32, any strides, same device as G.
    mask: optional bool tensor broadcastable to ``X.shape[:-1]``; rows where it is False (padding)
    are skipped. Returns G.
    """
    torch.ops.regmean_fast.gram_update(G, X, mask)
    return G


def symmetrize_(G: torch.Tensor) -> torch.Tensor:
    """In place: copy the upper triangle of the float32 square matrix G into its lower triangle."""
    torch.ops.regmean_fast.symmetrize_(G)
    return G
