"""Spherical interpolation of two models, as mergekit's slerp: per tensor, v0 = the base model's, v1 = the other
model's, both taken whole (flattened):

    dot = <v0 / |v0|, v1 / |v1|>            (a norm <= 1e-8 is not divided by)
    |dot| > 0.9995:  W = (1 - t) v0 + t v1  (nearly parallel: linear interpolation)
    else:            theta = acos(dot);  W = sin((1 - t) theta) / sin(theta) v0 + sin(t theta) / sin(theta) v1

t (0: the base, 1: the other model) may be a gradient over the layers or filtered by tensor name."""

from __future__ import annotations

import math

import torch

from .base import REQUIRED, MergeMethod, check_number

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


CHUNK = 1 << 22  # elements per float64 chunk of the reductions (no whole-tensor float64 copy)


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return sum(float(torch.dot(a[i:i + CHUNK].double(), b[i:i + CHUNK].double()))
               for i in range(0, a.numel(), CHUNK))


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float]:
    """(s0, s1) with W = s0 v0 + s1 v1; the reductions in float64."""
    n0, n1 = math.sqrt(_dot64(v0, v0)), math.sqrt(_dot64(v1, v1))
    dot = _dot64(v0, v1)
    dot /= (n0 if n0 > NORM_EPS else 1.0) * (n1 if n1 > NORM_EPS else 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin(theta - theta * t) / s, math.sin(theta * t) / s


class Slerp(MergeMethod):
    name = "slerp"
    needs_base = True
    params = {"t": REQUIRED}
    model_params = {"weight": 1.0}

    def uses_coeffs(self, params):
        return False

    def check_params(self, params):
        p = super().check_params(params)
        p["t"] = check_number("t", p["t"])
        return p

    def merge(self, inputs, params):
        v0 = inputs.base()
        v1 = inputs.load(0)
        s0, s1 = slerp_coefficients(params["t"], v0, v1)
        return v0.mul_(s0).add_(v1, alpha=s1)
