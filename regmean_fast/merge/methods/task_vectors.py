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
is unspecified (not even stable on CPU). The random masks are the Philox4x32-10 stream of a key derived from
(seed, tensor name, model index) (ops.dare_drop_): the same for a seed whatever the device, the thread count,
the order or the shards of the run. (mergekit draws torch.bernoulli from the global generator: its masks
differ from ours for any seed; the distribution is the same.) The rescale factor ||delta||_1 / ||kept||_1 is
folded into the model's coefficient (one multiply per entry, in the consensus pass).
The passes over a whole tensor (top-k, draws, L1 norms, consensus) go a slice of ops.TASK_VECTOR_SLICE entries
at a time, or through compiled kernels on float32 CPU tensors (ops.magnitude_drop_, ops.dare_drop_,
ops.consensus_merge_): the
same values as on the whole tensor, with a slice's temporaries only (the L1 norms are fp64 sums of partial
fp64 sums: an order of summation of their own, within fp64 rounding of one whole-tensor sum)."""

from __future__ import annotations

import hashlib
import math

import torch

from ... import ops
from ..errors import MergeError
from .base import MergeMethod, check_number, check_unit_interval

RESCALE_EPS = 1e-7  # below it an L1 norm is not rescaled to (mergekit's)
DIVISOR_EPS = 1e-8  # |sum of weights| below it is not divided by (mergekit's, without consensus)


def dare_key(seed: int, name: str, i: int) -> tuple[int, int]:
    """The Philox key of model i's mask of tensor `name` under `seed`: the first 8 bytes of a sha256."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{i}".encode()).digest()
    return int.from_bytes(digest[0:4], "little"), int.from_bytes(digest[4:8], "little")


def keep_threshold(density: float) -> int:
    """The Philox word below which an entry is kept: ceil(density * 2^32) (exact: a power-of-two scaling)."""
    return math.ceil(density * (1 << 32))


def rescale_factor(before: float, after: float) -> float:
    """mergekit's rescale of a sparsified delta: ||delta||_1 / ||kept||_1, when both are >= RESCALE_EPS."""
    return before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0


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

    def _delta(self, inputs, i, base, rescale) -> tuple[torch.Tensor, float]:
        """(model i's sparsified delta W_i - B, its rescale factor: 1 unless rescaling)."""
        d = inputs.load(i).sub_(base).contiguous()  # (the passes below take flat slices)
        density = inputs.model_params[i]["density"] if inputs.model_params else 1.0
        if self.sparsification is None or density >= 1.0:
            return d, 1.0
        if self.sparsification == "random":
            before, after = ops.dare_drop_(d, dare_key(inputs.seed, inputs.name, i), keep_threshold(density))
            return d, rescale_factor(before, after) if rescale else 1.0
        k = kept_count(density, d.numel())
        if k <= 0:  # refused up front (plan); mergekit asserts
            raise MergeError(f"{inputs.name}: density {density} keeps no entry of {d.numel()}")
        before, after = ops.magnitude_drop_(d, k)
        return d, rescale_factor(before, after) if rescale else 1.0

    def merge(self, inputs, params):
        base = inputs.base().contiguous()
        w = inputs.raw_weights
        if not self.consensus:  # streaming: one model's delta at a time
            mixed = None
            for i in range(inputs.k):
                delta, factor = self._delta(inputs, i, base, params["rescale"])
                if mixed is None:
                    mixed = delta if factor * w[i] == 1.0 else delta.mul_(factor * w[i])
                else:
                    mixed.add_(delta, alpha=factor * w[i])
                del delta
            divisor = sum(w)
            if params["normalize"] and abs(divisor) >= DIVISOR_EPS:
                mixed.div_(divisor)
            return base.add_(mixed, alpha=params["scaling"])
        deltas, coeffs = zip(*(self._delta(inputs, i, base, params["rescale"]) for i in range(inputs.k)))
        # tau_i = coeffs[i] * w_i * delta_i; the consensus a slice at a time (or compiled), into base.
        return ops.consensus_merge_(base, deltas, [c * wi for c, wi in zip(coeffs, w)], w, params["normalize"],
                                    params["scaling"])


class TaskArithmetic(TaskVectorMerge):
    name = "task_arithmetic"


class Ties(TaskVectorMerge):
    name = "ties"
    consensus = True
    sparsification = "magnitude"
    default_normalize = True


# The random masks' generator: recorded in the merge's signature, so that --resume never mixes shards whose
# masks another build drew (earlier builds used torch's CPU generator).
MASK_DRAWS = "philox4x32-10 (sha256 key, counter j // 4)"


class DareTies(TaskVectorMerge):
    name = "dare_ties"
    consensus = True
    sparsification = "random"
    default_rescale = True
    draws = MASK_DRAWS


class DareLinear(TaskVectorMerge):
    name = "dare_linear"
    sparsification = "random"
    default_rescale = True
    draws = MASK_DRAWS
