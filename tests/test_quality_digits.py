"""Real-data integration test (issue #7): the from-scratch digits setup, fixed seeds.

An MLP "pre-trained" on MNIST-8x8 is fine-tuned on three real digit domains (scikit-learn digits,
MNIST-8x8, MNIST-8x8 rotated), then merged. RegMean must beat simple averaging and Fisher by clear
margins (the gaps are about 25-30 points; the asserted margins leave room for platform noise), and the
first layer's summed Gram is singular (the 8x8 corner pixels are always 0), so the merge must report
the ridge it added. The setup's RegMean++ equals an fp64 loop written here.
"""

import os
import sys

import pytest
import torch

pytest.importorskip("sklearn", reason="needs scikit-learn (pip install -e .[test])")
pytest.importorskip("mlxtend", reason="needs mlxtend (pip install -e .[test])")

from regmean_fast.quality import digits  # noqa: E402

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead (and spin on a shared machine)
    try:
        return {s: digits.run(seed=s, alpha=0.9) for s in SEEDS}
    finally:
        torch.set_num_threads(threads)


def _mean(row):
    return sum(row.values()) / len(row)


def test_first_layer_gram_is_singular():
    data, _ = digits.load_domains(0)
    always_zero = torch.ones(64, dtype=torch.bool)
    for split in data.values():
        always_zero &= (split.x_train == 0).all(0)
    assert int(always_zero.sum()) >= 1  # e.g. the corner pixel: sum_i G_i has a zero row and column


@pytest.mark.parametrize("seed", SEEDS)
def test_regmean_beats_average_and_fisher(results, seed):
    rows = results[seed]["rows"]
    rm, avg, fis = _mean(rows["RegMean (alpha=0.9)"]), _mean(rows["simple average"]), _mean(rows["Fisher"])
    ind = _mean(rows["individual (in-domain)"])
    msg = f"seed {seed}: RegMean {rm:.3f}, average {avg:.3f}, Fisher {fis:.3f}, individual {ind:.3f}"
    assert ind > 0.85, msg                      # the fine-tunes worked
    assert rm > avg + 0.10, msg
    assert rm > fis + 0.08, msg
    assert rm < ind + 0.02, msg                 # a merge does not beat the in-domain experts


def test_mean_over_seeds_margin(results):
    gap_avg = sum(_mean(r["rows"]["RegMean (alpha=0.9)"]) - _mean(r["rows"]["simple average"]) for r in results.values())
    gap_fis = sum(_mean(r["rows"]["RegMean (alpha=0.9)"]) - _mean(r["rows"]["Fisher"]) for r in results.values())
    assert gap_avg / len(results) > 0.15
    assert gap_fis / len(results) > 0.12


def test_merge_report_records_the_ridge(results):
    for seed, r in results.items():
        ridged = digits.ridge_layers(r["reports"]["RegMean (alpha=0.9)"])
        assert any(n.startswith("fc1") for n in ridged), f"seed {seed}: no ridge recorded for fc1: {ridged}"


def test_splits_are_disjoint_and_the_test_part_is_the_last_30_percent():
    data, _ = digits.load_domains(0)
    for d, split in data.items():
        n = len(split.y_train) + len(split.y_val) + len(split.y_test)
        assert len(split.y_test) == n - int(0.7 * n) and len(split.y_val) == int(0.7 * n) - int(0.6 * n), d
        rows = [tuple(r) for x in (split.x_train, split.x_val, split.x_test) for r in x.tolist()]
        if d != "sklearn-digits":  # MNIST-8x8 images are distinct; sklearn's scans have a few exact repeats
            assert len(set(rows)) == n, d


def test_regmean_plusplus_equals_an_fp64_loop():
    """Three random MLPs and inputs: layer l merged by RegMean's formula (test_regmean_pp._regmean_solve, fp64) with
    Grams of each model's inputs through the layers merged before it (ReLU between layers), biases averaged."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_regmean_pp import _regmean_solve

    torch.manual_seed(0)
    models = [digits.MLP().eval() for _ in range(3)]
    sds = [m.state_dict() for m in models]
    xs = [torch.randn(300, 64) + i for i in range(3)]
    got, report = digits.regmean_plusplus(sds, xs, alpha=0.7)
    hidden = [x.double() for x in xs]
    for li, layer in enumerate(digits.LAYERS):
        W = _regmean_solve([sd[f"{layer}.weight"].double() for sd in sds], [h.T @ h for h in hidden],
                           [len(h) for h in hidden], 0.7)
        b = sum(sd[f"{layer}.bias"].double() for sd in sds) / 3
        for name, want in ((f"{layer}.weight", W), (f"{layer}.bias", b)):
            err = float((got[name].double() - want).abs().max() / want.abs().max())
            assert err < 1e-5, (name, err)
        hidden = [h @ W.T + b for h in hidden]
        if li < len(digits.LAYERS) - 1:
            hidden = [torch.relu(h) for h in hidden]
    # through the merged prefix: the second layer differs from plain RegMean's (each model's own first layer)
    own = [torch.relu(x.double() @ sd["fc1.weight"].double().T + sd["fc1.bias"].double()) for x, sd in zip(xs, sds)]
    W_plain = _regmean_solve([sd["fc2.weight"].double() for sd in sds], [h.T @ h for h in own], [300] * 3, 0.7)
    assert float((got["fc2.weight"].double() - W_plain).abs().max() / W_plain.abs().max()) > 1e-2
    assert set(report["layers"]) == set(digits.LAYERS) and set(report["tensors"]) == set(got)
