"""Task arithmetic: W = W_base + scaling * sum_i w_i (W_i - W_base).

w_i are the models' weights as given (scaled to sum to 1 when normalize is true)."""

from ..errors import MergeError
from .base import MergeMethod, check_number


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    needs_base = True
    params = {"scaling": 1.0, "normalize": False}

    def check_params(self, params):
        p = super().check_params(params)
        p["scaling"] = check_number("scaling", p["scaling"])
        if not isinstance(p["normalize"], bool):
            raise MergeError(f"normalize must be true or false, got {p['normalize']!r}")
        return p

    def merge(self, inputs, params):
        w = inputs.coeffs if params["normalize"] else inputs.raw_weights
        base = inputs.base()
        delta = None
        for i in range(inputs.k):
            t = inputs.load(i).sub_(base)
            if delta is None:
                delta = t.mul_(w[i])
            else:
                delta.add_(t, alpha=w[i])
            del t
        return base.add_(delta, alpha=params["scaling"])
