"""mergekit's merge methods written out in float64 from their definitions (mergekit 0.1.5:
merge_methods/generalized_task_arithmetic.py, sparsify.py, slerp.py, linear.py, config.py's
evaluate_setting, plan.py's layer position t), independently of regmean_fast, for the tests to compare with.

    setting_value(setting, name, t)                       a parameter's value for one tensor
    layer_t(name, num_layers)                              mergekit's t for a llama-style tensor name
    linear(tensors, weights, normalize=True)
    task_vectors(base, tensors, weights, densities, *, consensus, sparsify, normalize, rescale, lam, masks=None)
    slerp(t, v0, v1)
    philox4x32_10(counters, key), dare_mask(shape, density, seed, name, i)   regmean_fast's DARE masks
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
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


def philox4x32_10(counters: np.ndarray, key) -> np.ndarray:
    """Philox4x32-10 (Salmon et al., SC11) of each row of counters (uint64 [n, 4], words < 2^32) under key
    (two words), in numpy's unsigned arithmetic: uint64 [n, 4]. Written from the paper, independently of the
    package's C++ and torch versions."""
    mask = np.uint64(0xFFFFFFFF)
    c = [counters[:, w].astype(np.uint64) for w in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
        p0, p1 = c[0] * np.uint64(0xD2511F53), c[2] * np.uint64(0xCD9E8D57)
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
    return np.stack(c, axis=1)


def dare_mask(shape, density: float, seed: int, name: str, i: int) -> torch.Tensor:
    """regmean_fast's documented DARE mask (docs/merge.md): key = the first 8 bytes of sha256(f"{seed}\\0{name}
    \\0{i}") as two little-endian words; entry j (flat) is kept when word j % 4 of Philox4x32-10(counter
    (j // 4, 0, 0, 0), key) < ceil(density * 2^32)."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{i}".encode()).digest()
    key = (int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little"))
    n = math.prod(shape)
    blocks = np.zeros(((n + 3) // 4, 4), dtype=np.uint64)
    blocks[:, 0] = np.arange(blocks.shape[0], dtype=np.uint64)
    words = philox4x32_10(blocks, key).reshape(-1)[:n]
    return torch.from_numpy(words < math.ceil(density * 2 ** 32)).view(shape)
