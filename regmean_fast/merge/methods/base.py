"""The interface every merge method implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import MergeError


@dataclass
class TensorInputs:
    """One output tensor's inputs, loaded lazily (so a method can stream over the K models).

    load(i) -> model i's tensor in the compute dtype on the compute device; base() likewise for the
    base model (None without one); fisher(i) -> model i's diagonal Fisher or None.
    coeffs: the models' weights scaled to sum to 1; raw_weights: as given.
    """

    name: str
    k: int
    load: Callable[[int], torch.Tensor]
    coeffs: list
    raw_weights: list
    base: Callable[[], torch.Tensor | None] = lambda: None
    fisher: Callable[[int], torch.Tensor | None] = lambda i: None
    info: dict = field(default_factory=dict)


class MergeMethod:
    """A merge method: per-tensor `merge(inputs) -> tensor`; RegMean adds a per-group solve."""

    name: str = ""
    needs_base: bool = False
    needs_stats: bool = False  # one statistics (Gram) file per model
    needs_data: bool = False  # one calibration data file per model, read at merge time (RegMean++)
    params: dict = {}  # parameter -> default

    def check_params(self, params: dict) -> dict:
        """Fill defaults and validate; raises MergeError."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise MergeError(f"unknown parameter(s) for method {self.name}: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(self.params)) or 'none'})")
        out = dict(self.params)
        out.update(params)
        return out

    def merge(self, inputs: TensorInputs, params: dict) -> torch.Tensor:
        raise NotImplementedError


def weighted_average(inputs: TensorInputs) -> torch.Tensor:
    """sum_i c_i W_i, streaming over the models."""
    acc = None
    for i in range(inputs.k):
        t = inputs.load(i)
        if acc is None:
            acc = t.mul_(inputs.coeffs[i]) if inputs.coeffs[i] != 1.0 else t
        else:
            acc.add_(t, alpha=inputs.coeffs[i])
        del t
    return acc


def as_number(name: str, value) -> float:
    """float(value), or a MergeError naming `name`; YAML's true/false are not numbers (float(True) is 1.0)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise MergeError(f"{name} must be a number, got {value!r}") from None


def check_unit_interval(name: str, value, *, open_left: bool = False) -> float:
    v = as_number(name, value)
    if not (v == v) or v > 1.0 or v < 0.0 or (open_left and v == 0.0):
        raise MergeError(f"{name} must be in {'(0' if open_left else '[0'}, 1], got {value!r}")
    return v


def check_number(name: str, value) -> float:
    v = as_number(name, value)
    if v != v or v in (float("inf"), float("-inf")):
        raise MergeError(f"{name} must be finite, got {value!r}")
    return v
