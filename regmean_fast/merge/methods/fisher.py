"""Diagonal Fisher merging (Matena & Raffel 2022), from the Fisher tensors of the statistics files:

    W = sum_i c_i (F_i + floor) W_i / sum_i c_i (F_i + floor)

Tensors without a Fisher in any statistics file are averaged."""

from .base import MergeMethod, check_number
from ..errors import MergeError


class Fisher(MergeMethod):
    name = "fisher"
    needs_stats = True
    negative_weights = False  # the weighted sum of Fishers must stay positive
    params = {"fisher_floor": 1e-6}

    def check_params(self, params):
        p = super().check_params(params)
        p["fisher_floor"] = check_number("fisher_floor", p["fisher_floor"])
        if p["fisher_floor"] < 0:
            raise MergeError(f"fisher_floor must be >= 0, got {p['fisher_floor']}")
        return p

    def merge(self, inputs, params):
        num = den = None
        for i in range(inputs.k):
            f = inputs.fisher(i)
            if f is None:
                raise MergeError(f"{inputs.name}: model {i} has no Fisher for this tensor")
            f = f.add(params["fisher_floor"]).mul_(inputs.coeffs[i])
            w = inputs.load(i).mul_(f)
            if num is None:
                num, den = w, f
            else:
                num.add_(w)
                den.add_(f)
        return num.div_(den)
