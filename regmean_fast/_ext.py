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


# What the compiled extension provides beyond the first release's ops (an older in-place build
# lacks them; callers then take the pure-PyTorch path):
#   HAS_CUDA_REDUCE: CUDA kernels for gram_reduce / pack_triu / unpack_triu.
#   HAS_SPD_SOLVE_OP: torch.ops.regmean_fast.spd_solve (cuSOLVER Xpotrf + Xpotrs on CUDA).
#   HAS_CUDA_BF16X3: CUDA kernels for split_bf16x3 / addmm_bf16x3_ (cublasGemmEx).
HAS_CUDA_REDUCE = False
HAS_SPD_SOLVE_OP = False
HAS_CUDA_BF16X3 = False
if HAVE_EXTENSION:
    _compiled_info = _C.build_info()
    HAS_CUDA_REDUCE = bool(_compiled_info.get("cuda_reduce", False))
    HAS_SPD_SOLVE_OP = bool(_compiled_info.get("spd_solve", False))
    HAS_CUDA_BF16X3 = bool(_compiled_info.get("cuda_bf16x3", False))


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
        cpu_model=compiled.get("cpu_model", "unknown"),
        cpu_features=compiled.get("cpu_features", "unknown"),
        cpu_paths=compiled.get("cpu_paths", ""),
        dare_drop_path=compiled.get("dare_drop_path", "torch"),
        torch_compiled=compiled["torch_version"],
        cuda_reduce=bool(compiled.get("cuda_reduce", False)),
        cuda_gram_wmma=bool(compiled.get("cuda_gram_wmma", False)),
        spd_solve_op=bool(compiled.get("spd_solve", False)),
        cuda_bf16x3=bool(compiled.get("cuda_bf16x3", False)),
    )
    error = cpu_path_error()
    if error:
        info["cpu_path_error"] = error
    else:
        info["cpu_gemm_path"] = {dt: _C.cpu_gemm_path(dt) for dt in ("float32", "bfloat16", "float16")}
    return info


def cpu_path_error() -> str | None:
    """Why REGMEAN_FAST_CPU_PATH (or its older name REGMEAN_FAST_CPU_GEMM) cannot be honoured here, in one
    line, or None (also without the extension, which has one path)."""
    if not HAVE_EXTENSION or not hasattr(_C, "cpu_gemm_path"):
        return None
    try:
        _C.cpu_gemm_path("bfloat16")  # every dtype resolves the same request
    except ValueError as e:
        return str(e)
    return None
