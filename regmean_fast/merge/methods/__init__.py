"""Merge methods, one module each, behind MergeMethod (methods/base.py)."""

from .average import Average
from .base import MergeMethod, TensorInputs
from .fisher import Fisher
from .regmean import GroupInputs, RegMean, RegMeanPlusPlus
from .task_arithmetic import TaskArithmetic
from .ties import Ties

METHODS = {m.name: m for m in (RegMean(), Average(), TaskArithmetic(), Ties(), Fisher(), RegMeanPlusPlus())}

__all__ = ["METHODS", "MergeMethod", "TensorInputs", "GroupInputs"]
