"""The task-vector family, as mergekit defines it (task_arithmetic, ties, dare_ties, dare_linear):

    delta_i = sparsify(W_i - B, density_i)        ties: the int(density * n) largest |entries| (magnitude);
                                                  dare: each entry kept with probability density (random);
                                                  rescale: times ||W_i - B||_1 / ||kept||_1 (when both > 1e-7)
    tau_i   = w_i delta_i                         w_i: the model's weight as given (negative: task negation)
    consensus (ties, dare_ties): s = +1 where sum_i tau_i >= 0 else -1; m_i = [sign(tau_i) == s]
        mixed = sum_i m_i tau_i,  divisor = sum_i m_i w_i (1 where 0)
    no consensus (task_arithmetic, dare_linear):
        mixed = sum_i tau_i,      divisor = sum_i w_i (1 where |.| < 1e-8)
    W = B + lambda * (mixed / divisor if normalize else mixed)

Defaults (mergekit's): density 1, lambda 1; normalize true for ties only; rescale true for dare_* only.
Ties at the magnitude cut-off: exactly int(density * n) entries are kept, as mergekit; among entries of equal
magnitude at the cut-off the earliest (flat index) are kept, where mergekit takes torch.argsort's order, which
is unspecified (not even stable on CPU). The random masks come from a generator seeded by (seed, tensor name,
model index): the same for a seed whatever the device, the order or the shards of the run."""

from __future__ import annotations

import hashlib

import torch

from ..errors import MergeError
from .base import MergeMethod, check_number, check_unit_interval

RESCALE_EPS = 1e-7  # below it an L1 norm is not rescaled to (mergekit's)
DIVISOR_EPS = 1e-8  # |sum of weights| below it is not divided by (mergekit's, without consensus)


def magnitude_keep(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k entries of largest magnitude; ties at the k-th magnitude go to the earliest entries."""
    mag = x.abs().reshape(-1)
    n = mag.numel()
    threshold = torch.kthvalue(mag.float().cpu() if mag.device.type == "mps" else mag, n - k + 1).values
    keep = mag > threshold
    short = k - int(keep.sum())
    if short > 0:
        at = mag == threshold
        # the first `short` of them (int32 running count: half the memory of the default int64)
        count_dtype = torch.int32 if n < 2**31 else torch.int64
        keep |= at & (torch.cumsum(at, 0, dtype=count_dtype) <= short)
    return keep.view_as(x)


def random_keep(shape, density: float, seed: int, name: str, i: int, device) -> torch.Tensor:
    """Each entry kept with probability density: uniform draws on the CPU from a generator seeded by
    (seed, name, i), so a seed gives the same mask on any device and in any order."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{i}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return (torch.rand(shape, generator=g) < density).to(device)


def rescaled(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    before = delta.abs().sum(dtype=torch.float64) if rescale else None
    delta.mul_(keep)
    if rescale:
        after = delta.abs().sum(dtype=torch.float64)
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            delta.mul_(float(before / after))
    return delta


def kept_count(density: float, n: int) -> int:
    """mergekit's count of kept entries for magnitude sparsification."""
    return int(density * n)


class TaskVectorMerge(MergeMethod):
    needs_base = True
    consensus = False
    sparsification: str | None = None  # "magnitude" | "random"
    default_normalize = False
    default_rescale = False

    def __init__(self):
        self.params = {"scaling": 1.0, "normalize": self.default_normalize, "rescale": self.default_rescale}
        self.model_params = {"weight": 1.0, "density": 1.0}

    def uses_coeffs(self, params):
        return False

    def check_params(self, params):
        p = super().check_params(params)
        p["scaling"] = check_number("scaling (lambda)", p["scaling"])
        for key in ("normalize", "rescale"):
            if not isinstance(p[key], bool):
                raise MergeError(f"{key} must be true or false, got {p[key]!r}")
        return p

    def check_model_params(self, params):
        p = super().check_model_params(params)
        p["density"] = check_unit_interval("density", p["density"], open_left=True)
        return p

    def _delta(self, inputs, i, base, rescale):
        d = inputs.load(i).sub_(base)
        density = inputs.model_params[i]["density"] if inputs.model_params else 1.0
        if self.sparsification is None or density >= 1.0:
            return d
        if self.sparsification == "magnitude":
            k = kept_count(density, d.numel())
            if k <= 0:  # refused up front (plan); mergekit asserts
                raise MergeError(f"{inputs.name}: density {density} keeps no entry of {d.numel()}")
            keep = magnitude_keep(d, k)
        else:
            keep = random_keep(d.shape, density, inputs.seed, inputs.name, i, d.device)
        return rescaled(d, keep, rescale)

    def merge(self, inputs, params):
        base = inputs.base()
        w = inputs.raw_weights
        if not self.consensus:  # streaming: one model's delta at a time
            mixed = None
            for i in range(inputs.k):
                tau = self._delta(inputs, i, base, params["rescale"]).mul_(w[i])
                mixed = tau if mixed is None else mixed.add_(tau)
                del tau
            divisor = sum(w)
            if params["normalize"] and abs(divisor) >= DIVISOR_EPS:
                mixed.div_(divisor)
            return base.add_(mixed, alpha=params["scaling"])
        taus = [self._delta(inputs, i, base, params["rescale"]).mul_(w[i]) for i in range(inputs.k)]
        elected = torch.where(sum(taus) >= 0, 1.0, -1.0).to(base.dtype)
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for i, tau in enumerate(taus):
            agree = torch.sign(tau) == elected
            mixed.add_(torch.where(agree, tau, torch.zeros((), dtype=tau.dtype, device=tau.device)))
            divisor.add_(agree.to(divisor.dtype), alpha=w[i])
        del taus
        if params["normalize"]:
            mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
        return base.add_(mixed, alpha=params["scaling"])


class TaskArithmetic(TaskVectorMerge):
    name = "task_arithmetic"


class Ties(TaskVectorMerge):
    name = "ties"
    consensus = True
    sparsification = "magnitude"
    default_normalize = True


class DareTies(TaskVectorMerge):
    name = "dare_ties"
    consensus = True
    sparsification = "random"
    default_rescale = True


class DareLinear(TaskVectorMerge):
    name = "dare_linear"
    sparsification = "random"
    default_rescale = True
