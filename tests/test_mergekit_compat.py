"""mergekit users' YAML files: every accepted one merges to mergekit's definition (written in fp64 in
tests/mergekit_fp64.py, from mergekit 0.1.5's code), every refused one is one line naming what to use instead.

Tiny random llama models (3 layers, so gradients have a middle) saved as folders: a base and three
"fine-tuned" copies (base + noise)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml

import mergekit_fp64 as mk
from test_merge_common import make_activations, read_folder, tiny_config, write_gram_files, lstsq_merge, share_key

from regmean_fast.cli import main

NUM_LAYERS = 3
K = 3


def _llama(seed):
    import transformers as tf

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = NUM_LAYERS
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    base = _llama(7)
    models = []
    for i in range(K):
        m = _llama(7)
        g = torch.Generator().manual_seed(70 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        models.append(m)
    out = {"root": root, "base": str(root / "base"), "paths": [str(root / f"m{i}") for i in range(K)]}
    base.save_pretrained(out["base"], safe_serialization=True)
    for m, p in zip(models, out["paths"]):
        m.save_pretrained(p, safe_serialization=True)
    for dt, tag in ((torch.bfloat16, "bf16"),):  # bf16 twins, as real LLMs ship
        out[f"base_{tag}"] = str(root / f"base_{tag}")
        base.to(dt).save_pretrained(out[f"base_{tag}"], safe_serialization=True)
        out[f"paths_{tag}"] = []
        for i, m in enumerate(models):
            p = str(root / f"m{i}_{tag}")
            m.to(dt).save_pretrained(p, safe_serialization=True)
            out[f"paths_{tag}"].append(p)
            m.float()
        base.float()
    mods, acts = make_activations(models[0], K, seed=3)
    (root / "grams").mkdir()
    out["grams"] = write_gram_files(models[0], mods, acts, root / "grams")
    out["mods"], out["acts"] = mods, acts
    out["sd_base"] = read_folder(out["base"])
    out["sds"] = [read_folder(p) for p in out["paths"]]
    return out


def _run(cfg: dict, tmp_path, name: str, capsys, extra=()):
    """Write the YAML, merge it with the CLI -> (output tensors, stderr)."""
    y = tmp_path / f"{name}.yaml"
    y.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / name
    capsys.readouterr()
    rc = main(["merge", str(y), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 0, err
    return read_folder(out), err


def _refused(cfg: dict, tmp_path, capsys, *needles):
    y = tmp_path / "refused.yaml"
    y.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "refused_out"
    capsys.readouterr()
    assert main(["merge", str(y), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("regmean_fast: error: "), err
    for s in needles:
        assert s in err, err
    assert not out.exists()
    return err


def _close(got, exp, name, tol=2e-6):
    torch.testing.assert_close(got.double(), exp, atol=tol, rtol=tol, msg=lambda s: f"{name}: {s}")


# -- slice 1: the task-vector family, weights, parameters as mergekit reads them ------------------------------
def test_ties_per_model_weights_density_lambda_and_base_listed(fx, tmp_path, capsys):
    """TIES divides by the sum of the agreeing models' weights; per-model density; lambda; int8_mask accepted
    with a note; the base listed under models (with a weight) is the base, not a fourth model."""
    w, dens = [1.0, 0.5, 2.0], [0.3, 0.5, 1.0]
    cfg = {"merge_method": "ties", "base_model": fx["base"],
           "models": [{"model": fx["base"], "parameters": {"weight": 5.0}}]
           + [{"model": p, "parameters": {"weight": wi, "density": di}} for p, wi, di in zip(fx["paths"], w, dens)],
           "parameters": {"lambda": 0.7, "int8_mask": True}, "dtype": "float32"}
    got, err = _run(cfg, tmp_path, "ties", capsys)
    assert "regmean_fast: note: int8_mask is ignored" in err, err
    for n, b in fx["sd_base"].items():
        exp = mk.task_vectors(b, [s[n] for s in fx["sds"]], w, dens, consensus=True, sparsify="magnitude",
                              normalize=True, rescale=False, lam=0.7)
        _close(got[n], exp, n)
    # normalize: false (the agreeing sum, undivided) and a global density for every model
    cfg["parameters"] = {"normalize": False, "density": 0.4}
    cfg["models"] = [{"model": p, "weight": wi} for p, wi in zip(fx["paths"], w)]
    got, _ = _run(cfg, tmp_path, "ties_sum", capsys)
    for n, b in fx["sd_base"].items():
        exp = mk.task_vectors(b, [s[n] for s in fx["sds"]], w, [0.4] * K, consensus=True, sparsify="magnitude",
                              normalize=False, rescale=False, lam=1.0)
        _close(got[n], exp, n)


def _save_like(fx, folder, tensors):
    """A model folder holding these tensors, with the base's config."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(open(os.path.join(fx["base"], "config.json")).read())
    return str(folder)


def test_ties_cut_off_counts_as_mergekit(fx, tmp_path, capsys):
    """int(density * n) entries kept (not ceil), ties at the cut-off resolved to the earliest entries: deltas
    of two magnitudes only (2^-7, 2^-8), exact in fp32 on a base on a 2^-12 grid."""
    base = {n: torch.round(b * 4096) / 4096 for n, b in fx["sd_base"].items()}
    g = torch.Generator().manual_seed(3)
    tied = {n: b + torch.where(torch.rand(b.shape, generator=g) < 0.6, 2.0 ** -7, 2.0 ** -8)
            * torch.where(torch.rand(b.shape, generator=g) < 0.5, 1.0, -1.0) for n, b in base.items()}
    bp, tp = _save_like(fx, tmp_path / "qbase", base), _save_like(fx, tmp_path / "tied", tied)
    got, _ = _run({"merge_method": "ties", "base_model": bp,
                   "models": [{"model": tp, "parameters": {"weight": 1.0, "density": 0.37}}]},
                  tmp_path, "ties_cut", capsys)
    for n, b in base.items():
        exp = mk.task_vectors(b, [tied[n]], [1.0], [0.37], consensus=True, sparsify="magnitude",
                              normalize=True, rescale=False, lam=1.0)
        assert torch.equal(got[n].double(), exp), n
        assert int((got[n] != b).sum()) == int(0.37 * b.numel()), n


def test_task_arithmetic_negation_and_normalize(fx, tmp_path, capsys):
    w = [1.0, -0.5, 0.25]  # a negative weight: task negation
    for normalize in (False, True):
        cfg = {"merge_method": "task_arithmetic", "base_model": fx["base"],
               "models": [{"model": p, "parameters": {"weight": wi}} for p, wi in zip(fx["paths"], w)],
               "parameters": {"lambda": 1.3, "normalize": normalize}}
        got, _ = _run(cfg, tmp_path, f"ta{normalize}", capsys)
        for n, b in fx["sd_base"].items():
            exp = mk.task_vectors(b, [s[n] for s in fx["sds"]], w, [1.0] * K, consensus=False, sparsify=None,
                                  normalize=normalize, rescale=False, lam=1.3)
            _close(got[n], exp, n)


def test_gradients_and_filters_for_any_parameter(fx, tmp_path, capsys):
    """Per-model weight gradients, a filtered lambda with a gradient fallback, a filtered density: each tensor
    gets mergekit's value for its name and layer position."""
    weights = [[0.0, 1.0], [1.0, 0.2, 0.5], {"filter": "self_attn", "value": 2.0}]
    lam = [{"filter": "mlp", "value": 0.5}, {"value": [1.0, 2.0]}]
    density = [{"filter": "q_proj", "value": 0.3}, {"filter": "*", "value": [0.9, 0.6]}]
    cfg = {"merge_method": "ties", "base_model": fx["base"],
           "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(fx["paths"], weights)],
           "parameters": {"lambda": lam, "density": density, "weight": 0.75}}  # global weight: model 2 outside attn
    got, _ = _run(cfg, tmp_path, "grad", capsys)
    seen = set()
    for n, b in fx["sd_base"].items():
        t = mk.layer_t(n, NUM_LAYERS)
        ws = [mk.setting_value(w, n, t) for w in weights[:2]] + [mk.setting_value([weights[2]], n, t)]
        ws = [0.75 if w is None else w for w in ws]
        d = mk.setting_value(density, n, t)
        exp = mk.task_vectors(b, [s[n] for s in fx["sds"]], ws, [d] * K, consensus=True, sparsify="magnitude",
                              normalize=True, rescale=False, lam=mk.setting_value(lam, n, t))
        _close(got[n], exp, n)
        seen.add((t, round(ws[1], 6)))
    assert {round(t, 3) for t, _ in seen} == {0.0, 0.5, 1.0}  # the middle layer interpolated
    # the saved regmean_config.yml keeps the settings as given: rerunning it writes the same bytes
    assert main(["merge", str(tmp_path / "grad" / "regmean_config.yml"), "--out", str(tmp_path / "again")]) == 0
    again = read_folder(tmp_path / "again")
    assert set(again) == set(got) and all(torch.equal(again[n], got[n]) for n in got)


def test_regmean_alpha_by_layer_and_module(fx, tmp_path, capsys):
    """RegMean's alpha as a filter list with a gradient: q_proj apart from k/v (its own solve), the rest by
    layer; each weight equals the fp64 least-squares RegMean with its own alpha."""
    alpha = [{"filter": "q_proj", "value": 0.3}, {"value": [1.0, 0.5]}]
    cfg = {"merge_method": "regmean", "models": [{"model": p, "grams": g} for p, g in zip(fx["paths"], fx["grams"])],
           "parameters": {"alpha": alpha}}
    got, _ = _run(cfg, tmp_path, "rm", capsys)
    rep = json.load(open(tmp_path / "rm" / "merge_report.json"))
    mods = dict(fx["mods"])
    for m in mods:
        n = f"{m}.weight"
        a = mk.setting_value(alpha, n, mk.layer_t(n, NUM_LAYERS))
        exp = lstsq_merge([s[n] for s in fx["sds"]], [acts[share_key(m)] for acts in fx["acts"]], alpha=a)
        _close(got[n], exp, n, tol=2e-5)
        assert rep["tensors"][n]["method"] == "regmean"
    q = "model.layers.1.self_attn.q_proj.weight"
    assert rep["tensors"][q]["group"] == [q]  # split from k/v (another alpha): one more solve
    assert len(rep["tensors"]["model.layers.1.self_attn.k_proj.weight"]["group"]) == 2


def test_dtypes_as_mergekit_means_them(fx, tmp_path, capsys):
    """bf16 inputs: dtype float32 (or out_dtype float32) writes float32; dtype bfloat16 computes in float32 and
    writes bfloat16, with a one-line note."""
    w = [1.0, 2.0, 3.0]
    models = [{"model": p, "weight": wi} for p, wi in zip(fx["paths_bf16"], w)]
    ins = [read_folder(p) for p in fx["paths_bf16"]]
    for key in ("dtype", "out_dtype"):
        got, err = _run({"merge_method": "linear", "models": models, key: "float32"}, tmp_path, f"f32{key}", capsys)
        assert "note" not in err
        cfg_json = json.load(open(tmp_path / f"f32{key}" / "config.json"))
        assert cfg_json.get("torch_dtype", cfg_json.get("dtype")) == "float32"
        for n in got:
            assert got[n].dtype == torch.float32, n
            _close(got[n], mk.linear([m[n] for m in ins], w), n)
    got, err = _run({"merge_method": "linear", "models": models, "dtype": "bfloat16"}, tmp_path, "bf16", capsys)
    notes = [ln for ln in err.splitlines() if "note: dtype bfloat16" in ln]
    assert len(notes) == 1 and "float32" in notes[0], err
    for n in got:  # the float32 result rounded once to bfloat16: within one bfloat16 step of the fp64 one
        assert got[n].dtype == torch.bfloat16, n
        torch.testing.assert_close(got[n].double(), mk.linear([m[n] for m in ins], w), rtol=2 ** -8, atol=1e-6)


def test_relative_paths_are_taken_from_the_working_directory(fx, tmp_path, capsys, monkeypatch):
    root = fx["root"]
    ydir = tmp_path / "configs"
    ydir.mkdir()
    monkeypatch.chdir(root)
    rel = [os.path.basename(p) for p in fx["paths"]]
    got, _ = _run({"merge_method": "linear", "models": rel}, ydir, "rel", capsys)
    for n in got:
        _close(got[n], mk.linear([s[n] for s in fx["sds"]], [1.0] * K), n)
    monkeypatch.chdir(tmp_path)  # the same relative paths do not exist from here: not taken from the YAML's folder
    _refused({"merge_method": "linear", "models": rel}, ydir, capsys, f"model folder not found: {rel[0]}")


def test_accepted_keys_that_change_nothing(fx, tmp_path, capsys):
    """tokenizer_source: base is our behaviour: the same bytes as without it."""
    base_cfg = {"merge_method": "task_arithmetic", "base_model": fx["base"], "models": fx["paths"]}
    a, _ = _run(base_cfg, tmp_path, "plain", capsys)
    b, _ = _run({**base_cfg, "tokenizer_source": "base"}, tmp_path, "tokbase", capsys)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_refusals_are_one_line_naming_the_alternative(fx, tmp_path, capsys):
    src = [{"model": p, "layer_range": [0, NUM_LAYERS]} for p in fx["paths"][:2]]
    models = [{"model": p} for p in fx["paths"]]
    cases = [
        ({"slices": [{"sources": [dict(x, layer_range=[0, NUM_LAYERS - 1]) for x in src]}], "merge_method": "slerp",
          "base_model": fx["paths"][0]},
         ("slices", f"has {NUM_LAYERS} layers, its layer_range is [0, {NUM_LAYERS - 1}]", "models:")),
        ({"slices": [{"sources": src[:1]}, {"sources": src[1:]}], "merge_method": "linear"},
         ("slices", "frankenmerges", "got 2 slices")),
        ({"slices": [{"sources": [src[0], dict(src[1], layer_range=[1, NUM_LAYERS])]}], "merge_method": "linear"},
         ("slices", f"layer ranges [0, {NUM_LAYERS}], [1, {NUM_LAYERS}]")),
        ({"merge_method": "passthrough", "models": models}, ("passthrough", "not supported", "linear")),
        ({"merge_method": "della", "base_model": fx["base"], "models": models}, ("della", "dare_ties")),
        ({"merge_method": "linear", "models": models, "tokenizer_source": "union"},
         ("union", "tokenizer_source: base")),
        ({"merge_method": "linear", "models": models, "tokenizer": {"source": "union"}}, ("tokenizer", "base")),
        ({"merge_method": "linear", "models": models, "chat_template": "chatml"},
         ("chat_template", "tokenizer_config")),
        ({"merge_method": "ties", "base_model": fx["base"], "models": [{"model": fx["paths"][0],
                                                                        "parameters": {"lambda": 2}}]},
         ("lambda is not a per-model parameter", "top-level parameters")),
        ({"merge_method": "ties", "base_model": fx["base"], "models": models, "parameters": {"density": 0.01}},
         ("keeps no entry", "mergekit refuses this too")),
        ({"merge_method": "slerp", "base_model": fx["base"], "models": models, "parameters": {"t": 0.5}},
         ("slerp merges two models",)),
        ({"merge_method": "slerp", "base_model": fx["base"], "models": models[:1]}, ("needs the parameter t",)),
        ({"merge_method": "regmean", "models": [dict(m, grams=g, weight=-1) for m, g in zip(models, fx["grams"])]},
         ("non-negative weights",)),
        ({"merge_method": "linear", "models": models, "parameters": {"weight": [1, {"filter": "x", "value": 1}]}},
         ("a list must hold only numbers",)),
    ]
    for cfg, needles in cases:
        _refused(cfg, tmp_path, capsys, *needles)


# -- slice 2: dare_ties, dare_linear, slerp ------------------------------------------------------------------
def _one_hot_dare(fx, tmp_path, capsys, density, seed, name):
    """dare_linear with weight 1 on model i and 0 on the others, normalize false: the output minus the base
    is model i's sparsified, rescaled delta, drawn as in a merge of all three (the draws depend on the model's
    index, the tensor and the seed only) -> per model {tensor: kept delta}."""
    kept = []
    for i in range(K):
        w = [1.0 if j == i else 0.0 for j in range(K)]
        got, _ = _run({"merge_method": "dare_linear", "base_model": fx["base"], "seed": seed,
                       "models": [{"model": p, "parameters": {"weight": wi}} for p, wi in zip(fx["paths"], w)],
                       "parameters": {"density": density}, "dtype": "float64"}, tmp_path, f"{name}{i}", capsys)
        kept.append({n: got[n].double() - b.double() for n, b in fx["sd_base"].items()})
    return kept


def test_dare_mask_statistics_and_exact_rescale(fx, tmp_path, capsys):
    density = 0.3
    kept = _one_hot_dare(fx, tmp_path, capsys, density, 11, "dare")
    n_kept = n_all = 0
    for i in range(K):
        for n, b in fx["sd_base"].items():
            delta = fx["sds"][i][n].double() - b.double()
            mask = kept[i][n] != 0
            n_kept += int(mask.sum())
            n_all += mask.numel()
            scale = delta.abs().sum() / (delta * mask).abs().sum()
            _close(kept[i][n], delta * mask * scale, n, tol=1e-12)  # the L1 rescale, exactly
    sd = (density * (1 - density) / n_all) ** 0.5
    assert abs(n_kept / n_all - density) < 5 * sd, (n_kept / n_all, sd)
    again = _one_hot_dare(fx, tmp_path, capsys, density, 11, "dare_again")
    other = _one_hot_dare(fx, tmp_path, capsys, density, 12, "dare_other")
    n = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(again[i][n], kept[i][n]) for i in range(K))  # deterministic for a seed
    assert not torch.equal(other[0][n] != 0, kept[0][n] != 0)


def test_dare_ties_and_linear_equal_the_definition(fx, tmp_path, capsys):
    density, seed, w = 0.5, 5, [1.0, 0.6, -0.4]
    kept = _one_hot_dare(fx, tmp_path, capsys, density, seed, "dt")
    masks = [{n: kept[i][n] != 0 for n in fx["sd_base"]} for i in range(K)]
    for method, consensus in (("dare_ties", True), ("dare_linear", False)):
        got, _ = _run({"merge_method": method, "base_model": fx["base"], "seed": seed, "dtype": "float64",
                       "models": [{"model": p, "parameters": {"weight": wi, "density": density}}
                                  for p, wi in zip(fx["paths"], w)]}, tmp_path, method, capsys)
        for n, b in fx["sd_base"].items():
            exp = mk.task_vectors(b, [s[n] for s in fx["sds"]], w, [density] * K, consensus=consensus,
                                  sparsify="random", normalize=False, rescale=True, lam=1.0,
                                  masks=[m[n] for m in masks])
            _close(got[n], exp, n, tol=1e-12)


def test_dare_and_slerp_flags_equal_yaml(fx, tmp_path, capsys):
    """--seed, --density and --param t=... on the command line write what the same YAML writes."""
    y = {"merge_method": "dare_ties", "base_model": fx["base"], "models": fx["paths"], "seed": 3,
         "parameters": {"density": 0.5}}
    a, _ = _run(y, tmp_path, "dare_yaml", capsys)
    assert main(["merge", "--method", "dare_ties", "--base-model", fx["base"], "--models", *fx["paths"],
                 "--seed", "3", "--density", "0.5", "--out", str(tmp_path / "dare_flags")]) == 0
    b = read_folder(tmp_path / "dare_flags")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    y = {"merge_method": "slerp", "base_model": fx["base"], "models": fx["paths"][:1], "parameters": {"t": [0.2, 0.8]}}
    a, _ = _run(y, tmp_path, "slerp_yaml", capsys)
    assert main(["merge", "--method", "slerp", "--base-model", fx["base"], "--models", fx["paths"][0],
                 "--param", "t=[0.2, 0.8]", "--out", str(tmp_path / "slerp_flags")]) == 0
    b = read_folder(tmp_path / "slerp_flags")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_slerp_with_gradients_and_the_parallel_fallback(fx, tmp_path, capsys):
    """mergekit's classic slerp config (t by module, a gradient over the layers); a model nearly parallel to
    the base for some tensors takes the linear interpolation there."""
    t = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]
    other = fx["paths"][1]
    cfg = {"merge_method": "slerp", "base_model": fx["base"], "models": [{"model": fx["base"]}, {"model": other}],
           "parameters": {"t": t}}
    got, _ = _run(cfg, tmp_path, "slerp", capsys)
    for n, b in fx["sd_base"].items():
        tv = mk.setting_value(t, n, mk.layer_t(n, NUM_LAYERS))
        _close(got[n], mk.slerp(tv, b, fx["sds"][1][n]), n)
    # the same config in mergekit's slices form (as its README writes it): the same merge
    sliced = {"slices": [{"sources": [{"model": fx["base"], "layer_range": [0, NUM_LAYERS]},
                                      {"model": other, "layer_range": [0, NUM_LAYERS]}]}],
              "merge_method": "slerp", "base_model": fx["base"], "parameters": {"t": 0.1}, "dtype": "float32"}
    sliced["slices"][0]["parameters"] = {"t": t}  # the slice's parameters win over the top level's
    got_sliced, _ = _run(sliced, tmp_path, "slerp_sliced", capsys)
    for n, b in fx["sd_base"].items():
        tv = mk.setting_value(t, n, mk.layer_t(n, NUM_LAYERS))
        _close(got_sliced[n], mk.slerp(tv, b, fx["sds"][1][n]), n)
    # nearly parallel: base scaled by 1.5 plus a little noise (|cos| > 0.9995) -> lerp
    g = torch.Generator().manual_seed(1)
    near = {n: 1.5 * b + 0.03 * b.pow(2).mean().sqrt() * torch.randn(b.shape, generator=g)
            for n, b in fx["sd_base"].items()}  # cos ~ 0.9998: the spherical formula would differ by ~4e-5
    folder = _save_like(fx, tmp_path / "near", near)
    got, _ = _run({"merge_method": "slerp", "base_model": fx["base"], "models": [folder],
                   "parameters": {"t": 0.3}}, tmp_path, "slerp_near", capsys)
    lerped = 0
    for n, b in fx["sd_base"].items():
        bd, nd = b.double(), near[n].double()
        cos = float((bd * nd).sum() / (bd.norm() * nd.norm()))
        if cos > 0.9995:
            _close(got[n], 0.7 * bd + 0.3 * nd, n)
            theta = math.acos(cos)  # what the spherical formula would give: measurably not the lerp
            spherical = (math.sin(0.7 * theta) * bd + math.sin(0.3 * theta) * nd) / math.sin(theta)
            lerped += int((spherical - got[n].double()).abs().max() > 1e-5 * nd.abs().max())
        _close(got[n], mk.slerp(0.3, b, near[n]), n)
    assert lerped == len(near)
