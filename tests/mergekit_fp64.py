"""mergekit's merge methods written out in float64 from their definitions (mergekit 0.1.5:
merge_methods/generalized_task_arithmetic.py, sparsify.py, slerp.py, linear.py, config.py's
evaluate_setting, plan.py's layer position t), independently of regmean_fast, for the tests to compare with.

    setting_value(setting, name, t)                       a parameter's value for one tensor
    layer_t(name, num_layers)                              mergekit's t for a llama-style tensor name
    linear(tensors, weights, normalize=True)
    task_vectors(base, tensors, weights, densities, *, consensus, sparsify, normalize, rescale, lam, masks=None)
    slerp(t, v0, v1)
"""

from __future__ import annotations

import math
import re

import torch


def setting_value(setting, name: str, t: float):
    """config.py's evaluate_setting: scalar; numeric list -> interpolation at t; list of {filter, value}
    -> the first whose filter is a substring of the name (None / '*' match all); None when none matches."""
    if not isinstance(setting, list):
        return setting
    if setting and isinstance(setting[0], dict):
        for e in setting:
            f = e.get("filter")
            if f is None or f == "*" or f in name:
                return setting_value(e["value"], name, t)
        return None
    x = t * (len(setting) - 1)
    lo = math.floor(x)
    hi = min(len(setting) - 1, lo + 1)
    return setting[lo] + (x - lo) * (setting[hi] - setting[lo])


def layer_t(name: str, num_layers: int) -> float:
    """plan.py: layer i of n has t = i / (n - 1) (1 when n == 1); embeddings, final norm, head: 0."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if not m:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def linear(tensors, weights, normalize=True):
    out = sum(w * t.double() for w, t in zip(weights, tensors))
    return out / sum(weights) if normalize else out


def top_k_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """sparsify.magnitude: the int(density * n) largest |entries|; among equal magnitudes at the cut-off the
    earliest (a stable descending sort: our documented choice where mergekit's argsort order is unspecified)."""
    flat = delta.abs().reshape(-1)
    k = int(density * flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return keep.view(delta.shape)


def task_vectors(base, tensors, weights, densities, *, consensus, sparsify, normalize, rescale, lam, masks=None):
    """GTATask.execute: sparsify each delta (magnitude, or the given random masks), optional L1 rescale,
    weight, sign consensus by sum (majority +1 where the sum >= 0), divide by the agreeing (or all) weights."""
    b = base.double()
    taus = []
    for i, (t, w, d) in enumerate(zip(tensors, weights, densities)):
        delta = t.double() - b
        if sparsify is not None and d < 1:
            keep = top_k_mask(delta, d) if sparsify == "magnitude" else masks[i]
            kept = delta * keep
            if rescale:
                before, after = delta.abs().sum(), kept.abs().sum()
                if before >= 1e-7 and after >= 1e-7:
                    kept = kept * (before / after)
            delta = kept
        taus.append(delta * w)
    if consensus:
        total = sum(taus)
        majority = torch.where(total >= 0, 1.0, -1.0).double()
        agree = [torch.sign(tau) == majority for tau in taus]
        mixed = sum(tau * a for tau, a in zip(taus, agree))
        divisor = sum(w * a.double() for w, a in zip(weights, agree))
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = sum(taus)
        divisor = sum(weights)
        if abs(divisor) < 1e-8:
            divisor = 1.0
    if normalize:
        mixed = mixed / divisor
    return b + lam * mixed


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """slerp.py: whole tensors; norms <= 1e-8 not divided by; |dot| > 0.9995 -> lerp."""
    a, b = v0.double(), v1.double()
    na, nb = a.norm(), b.norm()
    ua = a / na if na > 1e-8 else a
    ub = b / nb if nb > 1e-8 else b
    dot = float((ua * ub).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
