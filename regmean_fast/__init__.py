"""regmean_fast: fast, memory-frugal RegMean merging of fine-tuned language models.

Public surface (stable; see docs/architecture.md):

    regmean_fast.ops.gram_update(G, X, mask=None)   # triu(G) += X[mask]^T X[mask], fp32 G
    regmean_fast.ops.symmetrize_(G)                  # copy the upper triangle to the lower
    regmean_fast.regmean_solve(weights, grams, alpha=1.0, coeffs=None)
    regmean_fast.build_info()
"""

from __future__ import annotations

from . import ops
from ._ext import build_info
from .solve import regmean_solve
from .merge import merge, merge_modules, merge_state_dicts  # noqa: E402  (issue #4)
from .grams import GramSet, collect_grams, load_grams
from ._version import __version__

__all__ = ["merge", "merge_modules", "merge_state_dicts", "ops", "build_info", "regmean_solve", "load_grams", "GramSet", "collect_grams"]
