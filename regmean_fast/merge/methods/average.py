"""Weighted average: sum_i c_i W_i with the c_i scaled to sum to 1."""

from .base import MergeMethod, weighted_average


class Average(MergeMethod):
    name = "average"
    params = {}

    def merge(self, inputs, params):
        return weighted_average(inputs)
