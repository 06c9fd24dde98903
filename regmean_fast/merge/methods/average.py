"""Weighted average (mergekit's `linear`): sum_i c_i W_i with the c_i = w_i / sum_j w_j, or, with
normalize: false, the plain weighted sum sum_i w_i W_i."""

from ..errors import MergeError
from .base import MergeMethod, weighted_average


class Average(MergeMethod):
    name = "average"
    params = {"normalize": True}

    def check_params(self, params):
        p = super().check_params(params)
        if not isinstance(p["normalize"], bool):
            raise MergeError(f"normalize must be true or false, got {p['normalize']!r}")
        return p

    def uses_coeffs(self, params):
        return params["normalize"]

    def merge(self, inputs, params):
        if params.get("normalize", True):
            return weighted_average(inputs)
        return weighted_average(inputs, inputs.raw_weights)
