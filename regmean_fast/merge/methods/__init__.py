"""Merge methods, one module each, behind MergeMethod (methods/base.py)."""

from .average import Average
from .base import MergeMethod, TensorInputs
from .fisher import Fisher
from .regmean import GroupInputs, RegMean, RegMeanPlusPlus
from .slerp import Slerp
from .task_vectors import DareLinear, DareTies, TaskArithmetic, Ties

METHODS = {m.name: m for m in (RegMean(), Average(), TaskArithmetic(), Ties(), DareTies(), DareLinear(), Slerp(),
                               Fisher(), RegMeanPlusPlus())}

__all__ = ["METHODS", "MergeMethod", "TensorInputs", "GroupInputs"]
