"""The built-in demo.

`python -m regmean_fast demo` (main): the smallest honest RegMean evaluation: the real all-MiniLM-L6-v2
weights fine-tuned on four real sentiment domains (VADER), statistics and merges through the real CLI,
a table of held-out accuracy and of what RegMean gains over averaging (regmean_fast.quality.sentiment,
configuration DEMO; benchmarks/quality/run.py is the full one).

`python -m regmean_fast demo --synthetic` (main_synthetic): a synthetic RegMean merge, checked against
the fp64 closed form.

K "fine-tuned" copies of a linear layer (a shared base plus a task-specific change) each see
inputs from their own domain (a different subspace dominates). Each model's Gram is collected
from bf16 activations with the fast op; the merge runs the fast solve; the result is compared
with an fp64 least-squares solution that never forms a Gram, and with plain averaging on every
model's own data (the loss RegMean minimises).
"""

from __future__ import annotations

import sys
import time

import torch

from . import ops
from .solve import regmean_group


def synthetic_domains(k: int, d_in: int, d_out: int, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    weights, acts = [], []
    for i in range(k):
        # Domain i: inputs concentrated on its own random subspace, plus a little shared noise.
        basis = torch.linalg.qr(torch.randn(d_in, d_in // 4, generator=g))[0]
        X = torch.randn(rows, d_in // 4, generator=g) @ basis.T * 3.0 + 0.3 * torch.randn(rows, d_in, generator=g)
        acts.append(X.bfloat16())
        weights.append(base + 0.5 * torch.randn(d_out, d_in, generator=g) / d_in**0.5)
    return weights, acts


def domain_loss(W: torch.Tensor, Wi: torch.Tensor, X: torch.Tensor) -> float:
    """Mean squared output difference ||X (W - W_i)^T||^2 / rows on model i's own data."""
    Xd = X.double()
    return float(((Xd @ (W.double() - Wi.double()).T) ** 2).sum() / Xd.size(0))


def run(k: int = 3, d_in: int = 512, d_out: int = 384, rows: int = 4096, alpha: float = 0.9, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    weights, acts = synthetic_domains(k, d_in, d_out, rows, seed)
    grams, counts = [], []
    for X in acts:
        G = torch.zeros(d_in, d_in)
        ops.symmetrize_(ops.gram_update(G, X))
        grams.append(G)
        counts.append(X.size(0))
    t_grams = time.perf_counter() - t0
    t1 = time.perf_counter()
    (merged,), report = regmean_group([weights], grams, alpha=alpha, counts=counts, normalization="mean")
    t_merge = time.perf_counter() - t1

    # fp64 closed form from the raw activations (no Gram): stacked least squares, design.md.
    blocks, rhs = [], []
    for W, X in zip(weights, acts):
        Xd = X.double() / X.size(0) ** 0.5
        D = (Xd**2).sum(0)
        for rows_i in (alpha**0.5 * Xd, torch.diag(((1 - alpha) * D).sqrt())):
            blocks.append(rows_i)
            rhs.append(rows_i @ W.double().T)
    exact = torch.linalg.lstsq(torch.cat(blocks), torch.cat(rhs)).solution.T
    rel_error = float((merged.double() - exact).norm() / exact.norm())

    average = torch.stack(weights).mean(0)
    loss_avg = sum(domain_loss(average, W, X) for W, X in zip(weights, acts)) / k
    loss_rm = sum(domain_loss(merged, W, X) for W, X in zip(weights, acts)) / k
    return {
        "models": k, "d_in": d_in, "d_out": d_out, "rows": rows, "alpha": alpha,
        "rel_error_vs_fp64": rel_error, "loss_average": loss_avg, "loss_regmean": loss_rm,
        "grams_s": t_grams, "merge_s": t_merge, "solve": report.as_dict(),
    }


def main_synthetic(args=None) -> int:
    r = run(alpha=getattr(args, "alpha", 0.9))
    print(f"synthetic merge: {r['models']} models, one {r['d_out']}x{r['d_in']} layer, {r['rows']} bf16 tokens each, "
          f"alpha={r['alpha']}")
    print(f"  Grams (fast gram_update)      {r['grams_s'] * 1e3:8.1f} ms")
    print(f"  merge (fused reduce + solve)  {r['merge_s'] * 1e3:8.1f} ms   solve: {r['solve']['method']}")
    print(f"  relative error vs fp64 closed form: {r['rel_error_vs_fp64']:.2e}")
    print(f"  loss on each model's own data (mean over models, lower is better):")
    print(f"    simple average  {r['loss_average']:.4f}")
    print(f"    RegMean         {r['loss_regmean']:.4f}   ({r['loss_average'] / max(r['loss_regmean'], 1e-30):.1f}x lower)")
    ok = r["rel_error_vs_fp64"] < 1e-3 and r["loss_regmean"] < r["loss_average"]
    return 0 if ok else 1


def main_real(args=None) -> int:
    import dataclasses

    from .quality import fetch, report, sentiment

    alpha = getattr(args, "alpha", 0.9)
    cfg = dataclasses.replace(sentiment.DEMO, alphas=(alpha,))
    print(f"RegMean demo: all-MiniLM-L6-v2 fine-tuned on {len(cfg.domains)} VADER sentiment domains "
          f"({cfg.n_train} train / {cfg.n_test} test each, {cfg.epochs} epochs, seed {cfg.seeds[0]}), merged with "
          f"`python -m regmean_fast merge`; cached in {fetch.cache_dir()}/quality", flush=True)
    try:
        res = sentiment.run(cfg)
    except fetch.FetchError as e:
        print(f"regmean_fast: error: {e}", file=sys.stderr)
        return 2
    gains = sentiment.default_gains(cfg)
    print()
    print("held-out accuracy (%):")
    print(report.text_table(res, gains))
    g = report.gain(res, *gains[0])
    print(f"\nRegMean (alpha={alpha}) - simple average, mean over domains: {100 * g['mean']:+.1f} points "
          f"(one seed, {cfg.n_test} test examples per domain: differences under ~2 points are noise).")
    print(f"done in {res['seconds']:.0f} s. Full comparison (alpha sweep, TIES, task arithmetic, ensemble, "
          f"multi-task, 2 seeds): python benchmarks/quality/run.py")
    out = getattr(args, "out", None)
    if out:
        paths = report.write(res, out, gains, title="regmean_fast demo")
        print("wrote " + ", ".join(paths.values()))
    return 0


def main(args=None) -> int:
    if getattr(args, "synthetic", False):
        return main_synthetic(args)
    return main_real(args)
