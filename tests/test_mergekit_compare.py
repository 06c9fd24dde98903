"""Optional (marker `compare`, skipped without mergekit): mergekit itself and regmean_fast on the same YAML files
and tiny random llama folders write the same tensors (to fp32 rounding). The definitions these rely on are
tested without mergekit in test_mergekit_compat.py.

    PYTHONPATH=<a folder with mergekit 0.1.5> python -m pytest -q -m compare tests/test_mergekit_compare.py
"""

from __future__ import annotations

import pytest
import torch
import yaml

from test_mergekit_compat import _llama  # the same tiny models
from test_merge_common import read_folder

from regmean_fast.cli import main

mergekit = pytest.importorskip("mergekit.merge")
pytestmark = pytest.mark.compare


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkcmp")
    base = _llama(5)
    paths = []
    for i in range(3):
        m = _llama(5)
        g = torch.Generator().manual_seed(50 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        paths.append(str(root / f"m{i}"))
        m.save_pretrained(paths[-1], safe_serialization=True)
    base.save_pretrained(str(root / "base"), safe_serialization=True)
    return {"root": root, "base": str(root / "base"), "paths": paths}


def _mergekit(cfg: dict, out: str):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    mergekit.run_merge(MergeConfiguration.model_validate(cfg), out,
                       options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, random_seed=0))
    return read_folder(out)


def _ours(cfg: dict, tmp_path, name: str):
    y = tmp_path / f"{name}.yaml"
    y.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["merge", str(y), "--out", str(tmp_path / name)]) == 0
    return read_folder(tmp_path / name)


def _configs(f):
    w = [1.0, -0.5, 2.0]
    return {
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": p, "parameters": {"weight": wi}} for p, wi in zip(f["paths"], [1, 2, 3])]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": f["base"], "dtype": "float32",
                            "parameters": {"lambda": 0.8},
                            "models": [{"model": p, "parameters": {"weight": wi}} for p, wi in zip(f["paths"], w)]},
        "ties": {"merge_method": "ties", "base_model": f["base"], "dtype": "float32",
                 "parameters": {"lambda": 1.2, "int8_mask": True},
                 "models": [{"model": f["base"]}] + [
                     {"model": p, "parameters": {"weight": wi, "density": d}}
                     for p, wi, d in zip(f["paths"], [1.0, 0.5, 2.0], [0.3, [0.5, 0.9], 1.0])]},
        "ties_filters": {"merge_method": "ties", "base_model": f["base"], "dtype": "float32",
                         "parameters": {"density": [{"filter": "mlp", "value": 0.4}, {"value": 0.7}],
                                        "weight": [0.5, 1.5], "normalize": False},
                         "models": [{"model": p} for p in f["paths"]]},
        "slerp": {"merge_method": "slerp", "base_model": f["base"], "dtype": "float32",
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]},
                                       {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]},
                  "models": [{"model": f["base"]}, {"model": f["paths"][1]}]},
    }


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "ties_filters", "slerp"])
def test_same_tensors_as_mergekit(folders, tmp_path, name):
    cfg = _configs(folders)[name]
    theirs = _mergekit(cfg, str(tmp_path / f"mk_{name}"))
    ours = _ours(cfg, tmp_path, name)
    assert theirs and set(theirs) == set(ours)
    for n, t in theirs.items():
        assert ours[n].dtype == t.dtype, n
        torch.testing.assert_close(ours[n], t, atol=2e-6, rtol=2e-5, msg=lambda s: f"{name} {n}: {s}")
