"""The default solve does not lose precision silently (issue 18).

K copies of one model merge to that model for every alpha, whatever the conditioning (the solve is written
relative to model 0); different models match an fp64 solve of the same stored Grams within the tolerance
(an fp32 solve whose expected error is above it is redone in fp64, and the report says so); a sum that is not
positive definite as stored is repaired at its rounding level; a rank-deficient sum falls back to the
models' average where no data excites it. The oracles are fp64 and independent (tests/fp64_oracle.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from fp64_oracle import gram_merge, lstsq_merge, rel_err

from regmean_fast import solve
from regmean_fast.solve import PRECISION_TOL, regmean_group, solve_tolerance

ALPHAS = (0.0, 0.5, 0.9, 1.0)
CONDS = (1e2, 1e4, 1e6, 1e8, 1e10)


def grams_with_cond(d, cond, k, massive=0, seed=0):
    """k fp32 Grams sharing one eigenbasis, eigenvalues log-spaced over `cond` (each model's within 20% of the
    others'), so that their sum has about that condition; massive: that many input dimensions x30 (the few
    massive activations of real LLMs)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scale = torch.ones(d, dtype=torch.float64)
    scale[:massive] = 30.0
    out = []
    for _ in range(k):
        ev = torch.logspace(0, -math.log10(cond), d, dtype=torch.float64)
        ev = ev * (1 + 0.2 * torch.rand(d, generator=g, dtype=torch.float64))
        G = (Q * ev) @ Q.T * scale[:, None] * scale[None, :]
        out.append(((G + G.T) / 2).float())
    return out


def bf16_weights(k, d_out, d, spread, seed=1):
    """k weights with bf16 values: a shared one plus `spread` times noise each (0: identical models)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d, generator=g)
    return [(W + spread * torch.randn(d_out, d, generator=g)).bfloat16().float() for _ in range(k)]


@pytest.mark.parametrize("massive", [0, 4])
@pytest.mark.parametrize("cond", CONDS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_identical_models_come_back(cond, alpha, massive):
    grams = grams_with_cond(96, cond, 3, massive)
    ws = bf16_weights(3, 40, 96, 0.0)
    (merged,), report = regmean_group([ws], grams, alpha=alpha, normalization="sum")
    assert rel_err(merged, ws[0]) <= PRECISION_TOL, report
    assert torch.equal(merged.bfloat16(), ws[0].bfloat16())  # within the output dtype's rounding: the same bits
    assert not report.escalated  # nothing to refine: the models agree


@pytest.mark.parametrize("massive", [0, 4])
@pytest.mark.parametrize("cond", CONDS[:4])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_different_models_match_fp64_within_tolerance(cond, alpha, massive):
    grams = grams_with_cond(96, cond, 3, massive)
    A = sum(alpha * G.double() + (1 - alpha) * torch.diag(torch.diagonal(G.double())) for G in grams)
    assert float(torch.linalg.eigvalsh(A)[0]) > 0  # positive definite as stored: the closed form is the answer
    ws = bf16_weights(3, 40, 96, 0.05)
    (merged,), report = regmean_group([ws], grams, alpha=alpha, normalization="sum")
    assert rel_err(merged, gram_merge(grams, ws, alpha)) <= PRECISION_TOL, report
    assert report.error is not None and report.error <= PRECISION_TOL
    assert report.escalated == (report.fp32_error is not None and report.fp32_error > PRECISION_TOL)
    if alpha == 1.0 and cond >= 1e6:  # fp32 cannot reach 1e-5 there: the report says it went to fp64
        assert report.escalated and report.dtype == "float64"


def test_condition_estimate_bounds_the_true_one():
    """The estimate (Hager-Higham, 1-norm, diagonally scaled) is at least the true scaled 2-norm condition and
    not wildly above it, so the expected error neither hides a bad solve nor escalates every group."""
    for cond in CONDS[:4]:
        grams = grams_with_cond(96, cond, 3, massive=4)
        A = sum(G.double() for G in grams)
        r = torch.diagonal(A).rsqrt()
        ev = torch.linalg.eigvalsh(A * r[:, None] * r[None, :])
        true = float(ev[-1] / ev[0])
        _, _, report = solve.robust_factor_(sum(grams).contiguous())
        assert true <= report.cond <= 96 * true, (cond, true, report.cond)


def test_not_positive_definite_as_stored_is_repaired_at_its_rounding_level():
    """fp32 Grams of few examples with massive dimensions: the sum's smallest eigenvalue is negative as
    stored (rounding, not data); Cholesky fails, a shift of the order of the rounding repairs it (not a ridge
    of 1e-6 mean(diag) or more, which moved real weights by 66%), and identical models come back."""
    g = torch.Generator().manual_seed(0)
    scale = torch.ones(128)
    scale[[3, 77]] = 30.0
    grams = [(lambda X: X.T @ X)(torch.randn(40, 128, generator=g) * scale) for _ in range(2)]
    grams = [torch.triu(G) + torch.triu(G, 1).T for G in grams]
    assert float(torch.linalg.eigvalsh(sum(G.double() for G in grams))[0]) < 0  # the premise
    ws = bf16_weights(2, 32, 128, 0.0)
    (merged,), report = regmean_group([ws], grams, alpha=1.0, normalization="sum")
    assert report.method == "cholesky+repair" and 0 < report.ridge < 1e-5  # the old fallback: 1e-4 mean(diag)
    assert torch.equal(merged, ws[0])
    # different models: the solution of the repaired system (the shift pulls toward the average)
    ws = bf16_weights(2, 32, 128, 0.05)
    (merged,), report = regmean_group([ws], grams, alpha=1.0, normalization="sum")
    A = sum(G.double() for G in grams) / 2
    lam = torch.diag(report.ridge * torch.diagonal(A))
    avg = sum(w.double() for w in ws) / 2
    B = sum(G.double() @ w.double().T for G, w in zip(grams, ws)) / 2 + lam @ avg.T
    oracle = torch.linalg.solve(A + lam, B).T
    assert rel_err(merged, oracle) <= PRECISION_TOL, report


@pytest.mark.parametrize("alpha", [0.9, 1.0])
def test_rank_deficient_sum_falls_back_to_the_average(alpha):
    """Input dimensions no model's data excites (all-zero columns, like the digits' corner pixels or dead
    units): the ridge pulls toward the models' average, so there the merge is the average; everywhere it
    matches the fp64 least squares with the ridge-toward-average term."""
    g = torch.Generator().manual_seed(2)
    dead = [0, 5, 17, 40]
    Xs = []
    for _ in range(3):
        X = torch.randn(200, 48, generator=g, dtype=torch.float64) * (torch.rand(48, generator=g, dtype=torch.float64) + 0.5)
        X[:, dead] = 0.0
        Xs.append(X)
    ws = bf16_weights(3, 24, 48, 0.1, seed=3)
    grams = [(X.T @ X).float() for X in Xs]
    (merged,), report = regmean_group([ws], grams, alpha=alpha, normalization="sum")
    assert report.method in ("cholesky+repair", "cholesky+ridge") and report.ridge > 0
    diag = sum(torch.diagonal(G.double()) for G in grams) / 3  # the sum's diagonal, whatever alpha
    lam = report.ridge * torch.where(diag > 0, diag, diag.mean())  # a dimension without data: the mean's
    oracle = lstsq_merge(Xs, ws, alpha, None, "sum", ridge=lam)
    assert rel_err(merged, oracle) <= PRECISION_TOL
    avg = sum(w.double() for w in ws) / 3
    assert rel_err(merged[:, dead], avg[:, dead]) <= 1e-6  # the simple average where no data is


def _ill_conditioned_acts(n, d, seed):
    """Activations whose summed Gram (alpha 1) has a condition of about 1e7: fp32 alone cannot solve it to 1e-5."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    sv = torch.logspace(0, -3.5, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ (Q * sv) @ Q.T


ILL_KEY = "model.layers.0.self_attn.o_proj"


def _merge_with_an_ill_conditioned_group(tmp_path, out_dtype):
    """Two tiny Llamas whose o_proj Grams (ILL_KEY) have a condition of about 1e7, merged at alpha 1 into
    tmp_path/out -> (the models, their Gram files, the merge report)."""
    from test_merge_common import make_activations, make_models, save_model, write_gram_files

    from regmean_fast import merge

    _, models = make_models("llama", k=2, seed=5, noise=0.002)
    mods, acts = make_activations(models[0], 2, seed=5)
    for i, a in enumerate(acts):
        a[ILL_KEY] = _ill_conditioned_acts(a[ILL_KEY].shape[0] * 4, a[ILL_KEY].shape[1], seed=i)
    paths = [save_model(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    gpaths = write_gram_files(models[0], mods, acts, tmp_path)
    report = merge({"models": [{"model": p, "grams": g} for p, g in zip(paths, gpaths)],
                    "parameters": {"alpha": 1.0}, "out_dtype": out_dtype}, out=str(tmp_path / "out"))
    return models, gpaths, report


def test_merge_report_names_escalated_groups(tmp_path):
    """Through the CLI's merge: the ill-conditioned group is solved again in fp64, named in merge_report.json
    (solve.escalated, and its tensors' entries), and its result matches an fp64 solve of the stored Grams."""
    from test_merge_common import read_folder

    from regmean_fast import load_grams

    models, gpaths, _ = _merge_with_an_ill_conditioned_group(tmp_path, "float32")
    key, out = ILL_KEY, tmp_path / "out"
    report = json.load(open(out / "merge_report.json"))
    name = key + ".weight"
    entry = report["tensors"][name]
    assert entry["escalated"] and entry["solve_dtype"] == "float64", entry
    assert entry["fp32_expected_error"] > PRECISION_TOL >= entry["expected_error"] and entry["cond"] > 1e3
    summary = report["solve"]
    assert key + ".weight" in summary["escalated"] and not summary["above_tolerance"]
    assert set(summary["escalated"]) == {e["group"][0] for e in report["tensors"].values() if e.get("escalated")}
    gsets = [load_grams(p) for p in gpaths]
    grams = [gs.gram(key) / gs.count(key) for gs in gsets]
    ws = [m.get_submodule(key).weight.detach() for m in models]
    assert rel_err(read_folder(out)[name], gram_merge(grams, ws, 1.0)) <= PRECISION_TOL


def test_a_solve_that_cannot_reach_the_tolerance_warns(monkeypatch):
    """When even the fp64 solve's expected error is above the tolerance (here: a tolerance no solve reaches),
    one warning line per group, and the note in its report entries."""
    from test_merge_common import grams_from_acts, make_activations, make_models

    from regmean_fast import merge_state_dicts

    monkeypatch.setattr(solve, "PRECISION_TOL", 1e-300)
    _, models = make_models("llama", k=2, seed=6)
    mods, acts = make_activations(models[0], 2, seed=6)
    grams = []
    for a in acts:
        g, counts, module_map, _ = grams_from_acts(mods, a)
        grams.append({m: g[module_map[m]] / counts[module_map[m]] for m in module_map})
    sd, report = merge_state_dicts([m.state_dict() for m in models], grams, alpha=0.9, return_report=True)
    regmean = {n: e for n, e in report["tensors"].items() if e["method"] == "regmean"}
    assert regmean and all(e["escalated"] and "could not reach" in e["notes"][-1] for e in regmean.values())
    groups = {e["group"][0] for e in regmean.values()}
    lines = [w for w in report["warnings"] if "could not reach" in w]
    assert len(lines) == len(groups) and all("\n" not in w for w in lines)


def test_tolerance_follows_the_output_dtype():
    """fp32 and fp64 weights are held to PRECISION_TOL; bf16 and fp16 ones to 1/16 of their unit roundoff."""
    assert solve_tolerance(torch.float32) == solve_tolerance(torch.float64) == solve_tolerance(None) == PRECISION_TOL
    assert solve_tolerance(torch.bfloat16) == pytest.approx(2.0 ** -8 / 16)
    assert solve_tolerance(torch.float16) == pytest.approx(2.0 ** -11 / 16)


def test_bf16_output_keeps_an_fp32_solve_below_its_rounding():
    """A group whose fp32 estimate is above PRECISION_TOL but below the bf16 tolerance: escalated for fp32
    weights, kept in fp32 for bf16 ones, and those, rounded to bf16, are as close to the fp64 solve as the
    fp64 solve's own bf16 rounding (plus the tolerance)."""
    grams = grams_with_cond(96, 1e4, 3, massive=4)
    ws = bf16_weights(3, 40, 96, 0.2)
    oracle = gram_merge(grams, ws, 0.9)
    (m32,), r32 = regmean_group([ws], grams, alpha=0.9, normalization="sum")
    (m16,), r16 = regmean_group([ws], grams, alpha=0.9, normalization="sum", tol=solve_tolerance(torch.bfloat16))
    est = r32.fp32_error if r32.escalated else r32.error
    assert PRECISION_TOL < est <= solve_tolerance(torch.bfloat16), (r32, r16)  # the case this test is about
    assert r32.escalated and not r16.escalated and r16.dtype == "float32" and r16.precise
    assert rel_err(m16, oracle) <= solve_tolerance(torch.bfloat16)
    assert rel_err(m16.bfloat16(), oracle) <= rel_err(oracle.bfloat16(), oracle) + solve_tolerance(torch.bfloat16)


def test_merge_report_holds_bf16_weights_to_their_tolerance(tmp_path):
    """Through the merge: bf16 output weights are held to solve_tolerance(bf16), recorded per tensor and in
    the summary, and a group is escalated exactly when its fp32 estimate is above that."""
    _, _, report = _merge_with_an_ill_conditioned_group(tmp_path, "bfloat16")
    tol = solve_tolerance(torch.bfloat16)
    entries = [e for e in report["tensors"].values() if e["method"] == "regmean"]
    assert entries and all(e["tolerance"] == pytest.approx(tol, rel=1e-2) for e in entries)
    assert report["solve"]["tolerance"] == pytest.approx(tol, rel=1e-2)
    for e in entries:
        first = e.get("fp32_expected_error", e["expected_error"])
        assert e["escalated"] == (first > e["tolerance"]), e
