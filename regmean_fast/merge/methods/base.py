"""The interface every merge method implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ... import ops
from ..errors import MergeError

REQUIRED = object()  # a parameter without a default


@dataclass
class TensorInputs:
    """One output tensor's inputs, loaded lazily (so a method can stream over the K models).

    load(i) -> model i's tensor in the compute dtype on the compute device, a fresh one (load_stored(i): as
    stored, in a buffer reused from call to call, valid until the next call: for a method that only reads it,
    with no fresh pages per model and no conversion); base() likewise for the base model (None without one);
    fisher(i) -> model i's diagonal Fisher or None.
    coeffs: the models' weights scaled to sum to 1; raw_weights: as given.
    """

    name: str
    k: int
    load: Callable[[int], torch.Tensor]
    coeffs: list
    raw_weights: list
    base: Callable[[], torch.Tensor | None] = lambda: None
    fisher: Callable[[int], torch.Tensor | None] = lambda i: None
    model_params: list = field(default_factory=list)
    seed: int = 0
    info: dict = field(default_factory=dict)
    load_stored: Callable[[int], torch.Tensor] | None = None
    compute_dtype: torch.dtype = torch.float32  # the dtype the methods compute in


class MergeMethod:
    """A merge method: per-tensor `merge(inputs) -> tensor`; RegMean adds a per-group solve."""

    name: str = ""
    needs_base: bool = False
    needs_stats: bool = False  # one statistics (Gram) file per model
    needs_data: bool = False  # one calibration data file per model, read at merge time (RegMean++)
    draws: str | None = None  # the generator of the method's random draws, if any (part of a merge's signature)
    params: dict = {}  # parameter -> default (REQUIRED: must be given)
    # Per-model parameters (a models[i].parameters entry, else the global value, else this default), as
    # mergekit's tensor parameters; weight is every method's.
    model_params: dict = {"weight": 1.0}
    negative_weights: bool = True  # task negation (a negative weight) means something

    def check_params(self, params: dict) -> dict:
        """Fill defaults and validate; raises MergeError."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise MergeError(f"unknown parameter(s) for method {self.name}: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(set(self.params) | set(self.model_params))) or 'none'})")
        out = dict(self.params)
        out.update(params)
        missing = sorted(k for k, v in out.items() if v is REQUIRED)
        if missing:
            raise MergeError(f"method {self.name} needs the parameter {missing[0]}")
        return out

    def uses_coeffs(self, params: dict) -> bool:
        """Whether the weights are scaled to sum to 1 (then they must not sum to 0)."""
        return True

    def check_model_params(self, params: dict) -> dict:
        """One model's per-model parameters (weight included): defaults filled and validated."""
        out = dict(self.model_params)
        out.update(params)
        w = as_number("weight", out["weight"])
        if w != w or w in (float("inf"), float("-inf")):
            raise MergeError(f"weight must be finite, got {out['weight']!r}")
        if w < 0 and not self.negative_weights:
            raise MergeError(f"method {self.name} needs non-negative weights, got {out['weight']!r}")
        out["weight"] = w
        return out

    def merge(self, inputs: TensorInputs, params: dict) -> torch.Tensor:
        raise NotImplementedError


def weighted_average(inputs: TensorInputs, coeffs=None) -> torch.Tensor:
    """sum_i c_i W_i (c: inputs.coeffs unless given) into a fresh tensor of the compute dtype, streaming over the
    models, each read as stored where the engine offers it (load_stored: no converted copy per model)."""
    c = inputs.coeffs if coeffs is None else coeffs
    load = inputs.load_stored or inputs.load
    acc = None
    for i in range(inputs.k):
        t = load(i)
        if acc is None:
            acc = torch.empty(t.shape, dtype=inputs.compute_dtype, device=t.device)
        ops.scaled_add_(acc, t, c[i], assign=i == 0)
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
