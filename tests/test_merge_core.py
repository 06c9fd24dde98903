"""Priority (a): io + plan + engine, RegMean and average, against the fp64 least-squares oracle and
the reference implementation, on tiny Llama, BERT and GPT-2 models; outputs load with transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from test_merge_common import (fingerprint, grams_from_acts, lstsq_merge, make_activations, make_models,
                               model_class, read_folder, save_model, share_key, write_gram_files)

import regmean_fast
from regmean_fast.io import ModelFolder, ShardLayout, ShardedOutput
from regmean_fast.merge import DictGramSet, MergeError, merge, merge_modules, merge_state_dicts
from regmean_fast.merge.api import conv1d_modules


def _check_regmean(merged, models, mods, acts, alpha, coeffs=None, normalization="mean", atol=2e-5):
    for m, conv in mods:
        if f"{m}.weight" not in merged:  # tied head, not stored
            continue
        ws = []
        for mod in models:
            w = mod.get_submodule(m).weight.detach()
            ws.append(w.T if conv else w)
        ref = lstsq_merge(ws, [a[share_key(m)] for a in acts], alpha, coeffs, normalization)
        got = merged[f"{m}.weight"].double()
        got = got.T if conv else got
        torch.testing.assert_close(got, ref, atol=atol, rtol=1e-4, msg=lambda s: f"{m}: {s}")


def _check_average(merged, models, mods, coeffs=None):
    k = len(models)
    c = [1 / k] * k if coeffs is None else [x / sum(coeffs) for x in coeffs]
    linear = {f"{m}.weight" for m, _ in mods}
    sd = [m.state_dict() for m in models]
    for name, t in merged.items():
        if name in linear:
            continue
        exp = sum(ci * s[name].double() for ci, s in zip(c, sd))
        torch.testing.assert_close(t.double(), exp, atol=1e-6, rtol=1e-6, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_folder_merge_matches_lstsq_and_loads(arch, tmp_path):
    base, models = make_models(arch, k=3, seed=1)
    mods, acts = make_activations(models[0], 3, seed=1)
    paths = [save_model(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    gpaths = write_gram_files(models[0], mods, acts, tmp_path)
    out = tmp_path / "out"
    weights = [1.0, 2.0, 0.5]
    rep = merge({"models": [{"model": p, "grams": g, "weight": w} for p, g, w in zip(paths, gpaths, weights)],
                 "parameters": {"alpha": 0.9}}, out=str(out))
    merged = read_folder(out)
    assert set(merged) == set(read_folder(paths[0]))
    _check_regmean(merged, models, mods, acts, 0.9, weights)
    _check_average(merged, models, mods, weights)
    assert rep["groups"] < len(mods)  # q/k/v and gate/up share one solve
    # the output is a loadable HF folder that runs
    assert json.load(open(out / "config.json"))["dtype"] == "float32"
    m = model_class(arch).from_pretrained(str(out)).eval()
    with torch.no_grad():
        y = m(torch.randint(0, 100, (1, 7)))
    first = y[0] if isinstance(y, tuple) else (y.logits if hasattr(y, "logits") else y.last_hidden_state)
    assert torch.isfinite(first).all()
    report = json.load(open(out / "merge_report.json"))
    linear = {f"{m}.weight" for m, _ in mods}
    for n, entry in report["tensors"].items():  # per tensor: the method actually used, ridge, time
        assert entry["method"] == ("regmean" if n in linear else "average"), (n, entry)
        assert "time_s" in entry and (n not in linear or "ridge" in entry), (n, entry)
    assert (out / "README.md").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.parametrize("bf16", [False, True])
def test_wide_groups_solve_per_model_terms(tmp_path, monkeypatch, bf16):
    """Two models: gate/up (2 x 48 rows for d_in 32, and lm_head) are wider than K d_in, so the merge solves
    each model's d x d term and multiplies (solve._solve_terms_first); the result is the same RegMean."""
    from regmean_fast import solve

    calls = []
    real = solve._solve_terms_first

    def spy(*a):
        res = real(*a)
        calls.append(res[1] if res is not None else None)
        return res

    monkeypatch.setattr(solve, "_solve_terms_first", spy)
    _, models = make_models("llama", k=2, seed=3)
    if bf16:
        models = [m.to(torch.bfloat16).float() for m in models]  # bf16 values, checked in fp64 below
    mods, acts = make_activations(models[0], 2, seed=3)
    paths = [save_model(m.to(torch.bfloat16) if bf16 else m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    gpaths = write_gram_files(models[0], mods, acts, tmp_path)
    merge({"models": [{"model": p, "grams": g} for p, g in zip(paths, gpaths)], "parameters": {"alpha": 0.9},
           "out_dtype": "float32"}, out=str(tmp_path / "out"))
    assert calls.count([48, 48]) == 2 and [32, 16, 16] not in calls  # gate/up of both layers; not q/k/v
    _check_regmean(read_folder(tmp_path / "out"), models, mods, acts, 0.9)


def test_matches_reference_implementation(tmp_path):
    from regmean_fast import reference

    if not hasattr(reference, "merge_state_dicts"):
        pytest.skip("reference.merge_state_dicts not present yet")
    _, models = make_models("llama", k=3, seed=2)
    mods, acts = make_activations(models[0], 3, seed=2)
    sds = [m.state_dict() for m in models]
    per_model = [grams_from_acts(mods, a) for a in acts]
    grams = {m: [pm[0][share_key(m)] for pm in per_model] for m, _ in mods}
    counts = {m: [pm[1][share_key(m)] for pm in per_model] for m, _ in mods}
    groups = {}
    for m, _ in mods:
        groups.setdefault(share_key(m), []).append(m)
    ref, _ = reference.merge_state_dicts(sds, grams, counts, alpha=0.7, coeffs=[1, 1, 2], groups=groups)
    gsets = [DictGramSet(pm[0], counts=pm[1], module_map=pm[2]) for pm in per_model]
    got = merge_state_dicts(sds, gsets, alpha=0.7, weights=[1, 1, 2])
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4, msg=lambda s: f"{n}: {s}")


def test_identical_models_merge_to_themselves(tmp_path):
    _, models = make_models("gpt2", k=1, seed=3)
    mods, acts = make_activations(models[0], 3, seed=3)
    p = save_model(models[0], tmp_path / "m")
    gpaths = write_gram_files(models[0], mods, acts, tmp_path)
    for method in ("regmean", "average"):
        out = tmp_path / f"out_{method}"
        merge({"method": method, "models": [{"model": p, "grams": g} for g in gpaths]}, out=str(out))
        merged, orig = read_folder(out), read_folder(p)
        for n in orig:
            torch.testing.assert_close(merged[n], orig[n], atol=2e-5, rtol=1e-4)


def test_in_memory_modules_and_sum_normalization_float64():
    _, models = make_models("gpt2", k=2, seed=4)
    mods, acts = make_activations(models[0], 2, seed=4)
    gram_dicts = []
    for a in acts:  # FusionBench style: {module: normalised Gram}, no counts
        gram_dicts.append({m: (a[share_key(m)].T @ a[share_key(m)] / a[share_key(m)].shape[0]).float()
                           for m, _ in mods})
    merged = merge_modules(models, gram_dicts, alpha=0.5)
    sd = merged.state_dict()
    mods = [(m, c) for m, c in mods if m != "lm_head"]  # tied to wte: see test_in_memory_tied_head_is_its_embedding
    _check_regmean(sd, models, mods, acts, 0.5)
    # raw Grams with "sum" normalisation, solved in float64
    per_model = [grams_from_acts(mods, a) for a in acts]
    gsets = [DictGramSet(pm[0], counts=pm[1], module_map=pm[2], conv1d=pm[3]) for pm in per_model]
    sds = [m.state_dict() for m in models]
    got = merge_state_dicts(sds, gsets, alpha=0.5, normalization="sum", solve_dtype="float64")
    _check_regmean(got, models, mods, acts, 0.5, normalization="sum", atol=1e-6)
    # the input state dicts are untouched
    for m, s in zip(models, sds):
        for n, t in m.state_dict().items():
            assert torch.equal(t, s[n])


def test_in_memory_tied_head_is_its_embedding(tmp_path):
    """GPT-2's lm_head is its wte (one tensor). With a Gram for lm_head (FusionBench's dicts have one), the
    in-memory merge treats it as the folder merge does (not stored: its Gram unused, with a warning), so
    the merged module's tied embedding is the average of the embeddings, not a RegMean of the head."""
    _, models = make_models("gpt2", k=2, seed=8)
    mods, acts = make_activations(models[0], 2, seed=8)
    assert ("lm_head", False) in mods
    gram_dicts = [{m: (a[share_key(m)].T @ a[share_key(m)] / a[share_key(m)].shape[0]).float() for m, _ in mods}
                  for a in acts]
    merged = merge_modules(models, gram_dicts)
    wte = [m.transformer.wte.weight.detach().double() for m in models]
    torch.testing.assert_close(merged.transformer.wte.weight.double(), (wte[0] + wte[1]) / 2)
    assert merged.lm_head.weight is merged.transformer.wte.weight
    sd, rep = merge_state_dicts([m.state_dict() for m in models], gram_dicts, conv1d=conv1d_modules(models[0]),
                                return_report=True)
    assert list(sd) == list(models[0].state_dict()) and torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    assert any(w.startswith("lm_head.weight is tied") for w in rep["warnings"])
    # the folder merge of the same models and Grams: the same tensors
    paths = [save_model(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    gpaths = write_gram_files(models[0], mods, acts, tmp_path)
    merge({"models": [{"model": p, "grams": g} for p, g in zip(paths, gpaths)]}, out=str(tmp_path / "out"))
    folder = read_folder(tmp_path / "out")
    for n, t in folder.items():
        torch.testing.assert_close(sd[n], t, atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


def test_state_dict_source_sees_ties_only_in_shared_storage():
    from regmean_fast.merge.sources import StateDictSource

    w = torch.randn(3, 4)
    src = StateDictSource({"a": torch.empty(3, 4, device="meta"), "b": torch.empty(3, 4, device="meta"), "w": w,
                           "t": w, "row": w[1:], "copy": w.clone()})
    assert src.names() == ["a", "b", "w", "row", "copy"] and src.tied == {"t": "w"}


def test_bf16_models_and_out_dtype(tmp_path):
    _, models = make_models("llama", k=2, seed=5)
    mods, acts = make_activations(models[0], 2, seed=5)
    paths = [save_model(m.to(torch.bfloat16), tmp_path / f"m{i}") for i, m in enumerate(models)]
    gpaths = write_gram_files(models[0], mods, acts, tmp_path)
    out = tmp_path / "out"
    merge({"models": [{"model": p, "grams": g} for p, g in zip(paths, gpaths)]}, out=str(out))
    merged = read_folder(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"
    out2 = tmp_path / "out2"
    merge({"models": [{"model": p, "grams": g} for p, g in zip(paths, gpaths)], "out_dtype": "float32"}, out=str(out2))
    m2 = read_folder(out2)
    assert all(t.dtype == torch.float32 for t in m2.values())
    for n in merged:
        torch.testing.assert_close(m2[n].to(torch.bfloat16), merged[n])


def test_sharded_output_and_sharded_input(tmp_path):
    _, models = make_models("llama", k=2, seed=6)
    mods, acts = make_activations(models[0], 2, seed=6)
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp_path / f"m{i}"))
        m.save_pretrained(paths[-1], safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(os.path.join(paths[0], "model.safetensors.index.json"))
    gpaths = write_gram_files(models[0], mods, acts, tmp_path)
    out = tmp_path / "out"
    merge({"models": [{"model": p, "grams": g} for p, g in zip(paths, gpaths)], "shard_size": "16KB"}, out=str(out))
    index = json.load(open(out / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0].startswith("model-00001-of-")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_folder(out).values())
    _check_regmean(read_folder(out), models, mods, acts, 0.9)  # the default alpha (0.9 since issue 18)
    m = model_class("llama").from_pretrained(str(out))
    assert m is not None


def test_allow_missing_grams_falls_back_with_warning(tmp_path):
    _, models = make_models("llama", k=2, seed=7)
    mods, acts = make_activations(models[0], 2, seed=7)
    per_model = [grams_from_acts(mods, a) for a in acts]
    drop = "model.layers.1.self_attn.o_proj"
    g0, c0, mm0, _ = per_model[0]
    mm0 = {m: k for m, k in mm0.items() if m != drop}
    gsets = [DictGramSet({k: g0[k] for k in set(mm0.values())}, counts=c0, module_map=mm0),
             DictGramSet(per_model[1][0], counts=per_model[1][1], module_map=per_model[1][2])]
    sds = [m.state_dict() for m in models]
    with pytest.raises(MergeError, match="no Gram for model.layers.1.self_attn.o_proj"):
        merge_state_dicts(sds, gsets)
    got, rep = merge_state_dicts(sds, gsets, allow_missing_grams=True, return_report=True)
    assert any(drop in w for w in rep["warnings"])
    torch.testing.assert_close(got[f"{drop}.weight"], (sds[0][f"{drop}.weight"] + sds[1][f"{drop}.weight"]) / 2)
    # regmean_exclude: averaged, no warning
    got, rep = merge_state_dicts(sds, gsets[1:] * 2, regmean_exclude=[r"o_proj"], return_report=True)
    assert rep["tensors"][f"{drop}.weight"]["method"] == "average" and not rep["warnings"]


def test_io_reader_and_streaming_writer_roundtrip(tmp_path):
    from safetensors.torch import load_file

    ts = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16),
          "d": torch.randn(1000, 3, dtype=torch.float64)}
    layout = ShardLayout.build([(n, t.dtype, t.shape) for n, t in ts.items()], shard_size=200)
    out = ShardedOutput(str(tmp_path), layout, "h")
    for n, t in ts.items():
        out.write(n, t)
    assert out.complete()
    back = {}
    for fname, _ in layout.shards:
        back.update(load_file(str(tmp_path / fname)))  # the official reader accepts our files
    for n in ts:
        assert torch.equal(back[n], ts[n])
    (tmp_path / "m").mkdir()
    for fname, _ in layout.shards:
        os.rename(tmp_path / fname, tmp_path / "m" / fname)
    with ModelFolder(str(tmp_path / "m")) as mf:
        assert sorted(mf.names()) == sorted(ts)
        for n in ts:
            assert torch.equal(mf.get(n), ts[n])
            into = torch.full_like(ts[n], 0)
            assert mf.get(n, out=into) is into and torch.equal(into, ts[n])  # straight into a given buffer
        with pytest.raises(ValueError, match="cannot read it into"):
            mf.get("a", out=torch.empty(5, 3))


def test_io_reader_maps_nothing(tmp_path):
    """Tensors are read with pread: no file page of a shard ever counts in the resident set (a memory map
    kept the pages the kernel's fault-around mapped next to each tensor, growing with depth)."""
    ts = {f"t{i}": torch.randn(300, 7) for i in range(5)}
    layout = ShardLayout.build([(n, t.dtype, t.shape) for n, t in ts.items()], shard_size=10**9)
    out = ShardedOutput(str(tmp_path), layout, "h")
    for n, t in ts.items():
        out.write(n, t)
    with ModelFolder(str(tmp_path)) as mf:
        for n in ts:
            assert torch.equal(mf.get(n), ts[n])
        with open("/proc/self/maps") as f:
            assert str(tmp_path) not in f.read()


def test_model_folder_reads_the_weights_transformers_reads(tmp_path):
    """Beside model.safetensors, other safetensors files (a Gram file, a checkpoint) are not weights: the
    merge's reader and the statistics' file list both take model.safetensors alone, as transformers does."""
    from safetensors.torch import save_file

    from regmean_fast.io.models import check_model_dir

    _, models = make_models("llama", k=1, seed=3)
    path = save_model(models[0], tmp_path / "m")
    save_file({"gram.model.layers.0.mlp.up_proj": torch.eye(4)}, os.path.join(path, "m.grams.safetensors"))
    save_file({"model.norm.weight": torch.zeros(3)}, os.path.join(path, "other.safetensors"))
    with ModelFolder(path) as mf:
        assert sorted(mf.names()) == sorted(models[0].state_dict())
        assert [os.path.basename(f) for f in mf.files()] == ["model.safetensors"]
    assert [os.path.basename(f) for f in check_model_dir(path)] == ["model.safetensors"]
