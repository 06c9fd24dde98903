"""Optional (marker `compare`, skipped without mergekit): mergekit itself and regmean_fast on the same YAML files
and tiny random llama folders write the same tensors (to fp32 rounding). The definitions these rely on are
tested without mergekit in test_mergekit_compat.py.

    PYTHONPATH=<a folder with mergekit 0.1.5> python -m pytest -q -m compare tests/test_mergekit_compare.py
"""

from __future__ import annotations

import pytest
import torch
import yaml

from test_mergekit_compat import NUM_LAYERS, _llama  # the same tiny models
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
        # the classic slerp config as mergekit's README writes it: one slice of whole models, t in the slice
        "slerp_slices": {"merge_method": "slerp", "base_model": f["base"], "dtype": "float32",
                         "slices": [{"sources": [{"model": p, "layer_range": [0, NUM_LAYERS]}
                                                 for p in (f["base"], f["paths"][1])],
                                     "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]},
                                                          {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]}}],
                         "parameters": {"t": 0.9}},
    }


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "ties_filters", "slerp", "slerp_slices"])
def test_same_tensors_as_mergekit(folders, tmp_path, name):
    cfg = _configs(folders)[name]
    theirs = _mergekit(cfg, str(tmp_path / f"mk_{name}"))
    ours = _ours(cfg, tmp_path, name)
    assert theirs and set(theirs) == set(ours)
    for n, t in theirs.items():
        assert ours[n].dtype == t.dtype, n
        torch.testing.assert_close(ours[n], t, atol=2e-6, rtol=2e-5, msg=lambda s: f"{name} {n}: {s}")


def test_dare_drop_and_rescale_as_mergekit(folders, tmp_path):
    """mergekit's dare_linear (its own random draws) and ours: for one model of weight 1, the output minus the
    base is the delta on the kept entries times ||delta||_1 / ||kept||_1, with about density of them kept."""
    from safetensors.torch import load_file

    base = load_file(f"{folders['base']}/model.safetensors")
    model = load_file(f"{folders['paths'][0]}/model.safetensors")
    cfg = {"merge_method": "dare_linear", "base_model": folders["base"], "dtype": "float32",
           "parameters": {"density": 0.4}, "models": [{"model": folders["paths"][0], "parameters": {"weight": 1.0}}]}
    for name, got in (("mergekit", _mergekit(cfg, str(tmp_path / "mk"))), ("ours", _ours(cfg, tmp_path, "ours"))):
        kept = n_all = 0
        for n, b in base.items():
            delta = model[n].double() - b.double()
            out = got[n].double() - b.double()
            mask = out != 0
            kept, n_all = kept + int(mask.sum()), n_all + mask.numel()
            exp = delta * mask * (delta.abs().sum() / (delta * mask).abs().sum())
            torch.testing.assert_close(out, exp, atol=1e-6, rtol=1e-4, msg=lambda s: f"{name} {n}: {s}")
        assert abs(kept / n_all - 0.4) < 5 * (0.24 / n_all) ** 0.5, (name, kept / n_all)


def test_dtype_bfloat16_within_bf16_rounding_of_mergekit(folders, tmp_path):
    """dtype: bfloat16 - mergekit adds in bf16, we in fp32 then round: the same merge to a few bf16 steps."""
    cfg = {"merge_method": "linear", "dtype": "bfloat16",
           "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(folders["paths"], [1, 2, 3])]}
    theirs = _mergekit(cfg, str(tmp_path / "mk"))
    ours = _ours(cfg, tmp_path, "ours")
    assert theirs and set(theirs) == set(ours)
    for n, t in theirs.items():
        assert ours[n].dtype == t.dtype == torch.bfloat16, n
        torch.testing.assert_close(ours[n].double(), t.double(), atol=1e-3, rtol=2 ** -6, msg=lambda s: f"{n}: {s}")
