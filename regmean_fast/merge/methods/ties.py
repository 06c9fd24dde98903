"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint mean of the task vectors.

    tau_i  = w_i * trim(W_i - W_base, density)      keep the ceil(density * n) largest |entries|
    s      = sign(sum_i tau_i)
    merged = sum_i tau_i [sign(tau_i) == s, tau_i != 0] / max(1, #agreeing models)
    W      = W_base + scaling * merged
"""

import math

import torch

from .base import MergeMethod, check_number, check_unit_interval


def trim_top(x: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ceil(density * numel) entries of largest magnitude (ties at the threshold kept)."""
    n = x.numel()
    if density >= 1.0 or n == 0:
        return x
    k = max(1, math.ceil(density * n))
    mag = x.abs().reshape(-1)
    threshold = torch.kthvalue(mag.float().cpu() if mag.device.type == "mps" else mag, n - k + 1).values
    return x.masked_fill_(x.abs() < threshold, 0)


class Ties(MergeMethod):
    name = "ties"
    needs_base = True
    params = {"density": 0.2, "scaling": 1.0}

    def check_params(self, params):
        p = super().check_params(params)
        p["density"] = check_unit_interval("density", p["density"], open_left=True)
        p["scaling"] = check_number("scaling", p["scaling"])
        return p

    def merge(self, inputs, params):
        base = inputs.base()
        taus = []
        for i in range(inputs.k):
            t = trim_top(inputs.load(i).sub_(base), params["density"])
            taus.append(t.mul_(inputs.raw_weights[i]))
        elected = torch.sign(sum(taus))
        num = torch.zeros_like(base)
        cnt = torch.zeros_like(base)
        for t in taus:
            agree = (torch.sign(t) == elected) & (t != 0)
            num.add_(torch.where(agree, t, torch.zeros_like(t)))
            cnt.add_(agree.to(cnt.dtype))
        merged = num.div_(cnt.clamp_(min=1.0))
        return base.add_(merged, alpha=params["scaling"])
