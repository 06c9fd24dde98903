"""Loads the compiled extension ``regmean_fast._C`` and says what it holds.

If the extension is missing (a source checkout that was never built, or a build without a
compiler), the package still works: the ops are registered from pure PyTorch instead and one
warning says so.
"""

from __future__ import annotations

import warnings

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.regmean_fast.*)

    HAVE_EXTENSION = True
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _C = None
    HAVE_EXTENSION = False
    _IMPORT_ERROR = str(exc)
    warnings.warn(
        "regmean_fast: the compiled extension is not available "
        f"({exc}); using the pure-PyTorch path. Build it with "
        "`pip install --no-build-isolation -e .`",
        RuntimeWarning,
        stacklevel=2,
    )


# The merge-side reduction has no CUDA kernel yet: CUDA tensors take the torch expression.
HAS_CUDA_REDUCE = False


def build_info() -> dict:
    """What was compiled and which fast paths are live in this process."""
    info = {
        "extension": HAVE_EXTENSION,
        "torch": torch.__version__,
        "cpu_kernels": False,
        "cuda_kernels": False,
        "cuda_archs": [],
        "cpu_blas": "none",
        "cpu_gemm_path": {},
    }
    if not HAVE_EXTENSION:
        info["extension_error"] = _IMPORT_ERROR
        return info
    compiled = _C.build_info()
    info.update(
        cpu_kernels=True,
        cuda_kernels=bool(compiled["cuda"]),
        cuda_archs=[a for a in compiled["cuda_archs"].split("_") if a],
        cpu_blas=compiled["cpu_blas"],
        torch_compiled=compiled["torch_version"],
        cpu_gemm_path={dt: _C.cpu_gemm_path(dt) for dt in ("float32", "bfloat16", "float16")},
    )
    return info
