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
    "gram_reduce": "gram_reduce(Tensor[] grams, float[] factors, float alpha, ScalarType? dtype=None) -> Tensor",
    "pack_triu": "pack_triu(Tensor G) -> Tensor",
    "unpack_triu": "unpack_triu(Tensor packed) -> Tensor",
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


def packed_order(n: int) -> int:
    """d such that d (d + 1) / 2 == n, or ValueError."""
    d = int(((8 * n + 1) ** 0.5 - 1) / 2)
    while d * (d + 1) // 2 < n:
        d += 1
    while d > 0 and d * (d + 1) // 2 > n:
        d -= 1
    if d * (d + 1) // 2 != n:
        raise ValueError(f"{n} is not the size of a packed triangle")
    return d


def gram_order(g: torch.Tensor, op: str) -> int:
    """Order of a full [d, d] or packed [d (d + 1) / 2] Gram."""
    if g.dim() == 2:
        if g.size(0) != g.size(1):
            raise ValueError(f"{op}: a full Gram must be square, got shape {tuple(g.shape)}")
        return g.size(0)
    if g.dim() != 1:
        raise ValueError(f"{op}: a Gram must be [d, d] or a packed [d (d + 1) / 2] triangle, got shape {tuple(g.shape)}")
    return packed_order(g.size(0))


def check_gram_reduce_args(grams, factors, alpha, dtype) -> int:
    if len(grams) == 0:
        raise ValueError("gram_reduce: no Grams given")
    if len(factors) != len(grams):
        raise ValueError(f"gram_reduce: {len(factors)} factors for {len(grams)} Grams")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"gram_reduce: alpha must be in [0, 1], got {alpha}")
    if dtype not in (None, torch.float32, torch.float64):
        raise TypeError(f"gram_reduce: dtype must be float32 or float64, got {dtype}")
    for g in grams:
        if g.dtype != torch.float32:
            raise TypeError(f"gram_reduce: Grams must be float32, got {g.dtype}")
        if g.shape != grams[0].shape:
            raise ValueError(f"gram_reduce: all Grams must have one shape, got {tuple(g.shape)} and {tuple(grams[0].shape)}")
    return gram_order(grams[0], "gram_reduce")


def reduce_expression(grams, factors, alpha, dtype) -> torch.Tensor:
    """sum_k f_k (alpha G_k + (1 - alpha) diag(G_k)) as the straightforward tensor expression, for
    full Grams of any float dtype (no checks: callers check)."""
    return sum(
        f * (alpha * G.to(dtype) + (1 - alpha) * torch.diag(torch.diagonal(G).to(dtype))) for G, f in zip(grams, factors)
    )


def torch_gram_reduce(grams, factors, alpha, dtype=None) -> torch.Tensor:
    """gram_reduce in pure PyTorch (the benchmark baseline and the no-extension path)."""
    check_gram_reduce_args(grams, factors, alpha, dtype)
    full = [torch_unpack_triu(g) if g.dim() == 1 else g for g in grams]
    return reduce_expression(full, factors, alpha, dtype or torch.float32)


def torch_pack_triu(G: torch.Tensor) -> torch.Tensor:
    check_symmetrize_args(G)
    rows, cols = torch.triu_indices(G.size(0), G.size(0), device=G.device)
    return G[rows, cols]


def torch_unpack_triu(packed: torch.Tensor) -> torch.Tensor:
    d = packed_order(packed.numel())
    rows, cols = torch.triu_indices(d, d, device=packed.device)
    G = packed.new_zeros(d, d)
    G[rows, cols] = packed
    G[cols, rows] = packed
    return G


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
    _fallback_lib.impl("gram_reduce", torch_gram_reduce, "CompositeExplicitAutograd")
    _fallback_lib.impl("pack_triu", torch_pack_triu, "CompositeExplicitAutograd")
    _fallback_lib.impl("unpack_triu", torch_unpack_triu, "CompositeExplicitAutograd")
    _fallback_lib.impl("symmetrize_", _symmetrize_fallback, "CompositeExplicitAutograd")


@torch.library.register_fake("regmean_fast::gram_update")
def _gram_update_fake(G, X, mask=None):
    check_gram_update_args(G, X, mask)


@torch.library.register_fake("regmean_fast::symmetrize_")
def _symmetrize_fake(G):
    check_symmetrize_args(G)


@torch.library.register_fake("regmean_fast::gram_reduce")
def _gram_reduce_fake(grams, factors, alpha, dtype=None):
    d = check_gram_reduce_args(grams, factors, alpha, dtype)
    return grams[0].new_empty((d, d), dtype=dtype or torch.float32)


@torch.library.register_fake("regmean_fast::pack_triu")
def _pack_triu_fake(G):
    check_symmetrize_args(G)
    d = G.size(0)
    return G.new_empty((d * (d + 1) // 2,))


@torch.library.register_fake("regmean_fast::unpack_triu")
def _unpack_triu_fake(packed):
    d = packed_order(packed.size(0))
    return packed.new_empty((d, d))


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


def gram_reduce(grams, factors, alpha: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``A = sum_k factors[k] * (alpha G_k + (1 - alpha) diag(G_k))`` in one pass, full symmetric.

    grams: K float32 Grams, all full [d, d] (only the upper triangle is read) or all packed
    [d (d + 1) / 2] upper triangles. dtype: float32 (default) or float64 for A. The factors carry
    the model coefficients and the normalisation (c_k / n_k for "mean").
    """
    grams = list(grams)
    factors = [float(f) for f in factors]
    if grams and grams[0].device.type != "cpu" and not _ext.HAS_CUDA_REDUCE:
        return torch_gram_reduce(grams, factors, float(alpha), dtype)
    return torch.ops.regmean_fast.gram_reduce(grams, factors, float(alpha), dtype)


def pack_triu(G: torch.Tensor) -> torch.Tensor:
    """The upper triangle of the float32 square G, row-major, as a 1-D tensor of d (d + 1) / 2."""
    if G.device.type != "cpu" and not _ext.HAS_CUDA_REDUCE:
        return torch_pack_triu(G)
    return torch.ops.regmean_fast.pack_triu(G)


def unpack_triu(packed: torch.Tensor) -> torch.Tensor:
    """The full symmetric [d, d] matrix whose packed upper triangle is given."""
    if packed.device.type != "cpu" and not _ext.HAS_CUDA_REDUCE:
        return torch_unpack_triu(packed)
    return torch.ops.regmean_fast.unpack_triu(packed)
