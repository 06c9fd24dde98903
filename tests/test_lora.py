"""PEFT LoRA adapter folders named as models (`merge` and `grams`): folded into their base as its tensors are read
(io.lora). Checked against W + scaling * B @ A computed here in fp64 from a hand-written adapter (no peft needed),
and, where peft is installed, against peft's own merge_and_unload of the same adapter."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import hf_tiny
from fp64_oracle import gram_merge, rel_err
from test_merge_common import assert_one_line_error, read_folder

from regmean_fast import load_grams
from regmean_fast.cli import main

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    texts = hf_tiny.random_texts(10, seed=3)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {"root": root, "data": str(data),
            "llama": hf_tiny.save_tiny(root / "llama", "llama", seed=0),
            "llama1": hf_tiny.save_tiny(root / "llama1", "llama", seed=1),
            "llama_bf16": hf_tiny.save_tiny(root / "llama_bf16", "llama", seed=2, dtype=torch.bfloat16),
            "gpt2": hf_tiny.save_tiny(root / "gpt2", "gpt2", seed=0),
            "gpt2_1": hf_tiny.save_tiny(root / "gpt2_1", "gpt2", seed=1)}


def _cli(argv, capsys):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# -- a hand-written adapter (no peft) -------------------------------------------------------------------------
def _write_adapter(folder, base, factors: dict, replaced: dict | None = None, **config):
    """factors: module -> (A, B) (or ("embedding", A, B)); replaced: tensor name -> tensor. peft's file layout."""
    os.makedirs(folder, exist_ok=True)
    sd = {}
    for module, f in factors.items():
        if f[0] == "embedding":
            sd[f"{PREFIX}{module}.lora_embedding_A"], sd[f"{PREFIX}{module}.lora_embedding_B"] = f[1], f[2]
        else:
            sd[f"{PREFIX}{module}.lora_A.weight"], sd[f"{PREFIX}{module}.lora_B.weight"] = f
    sd.update({f"{PREFIX}{n}": t for n, t in (replaced or {}).items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 3, "base_model_name_or_path": base,
           "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}), "fan_in_fan_out": False, **config}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return str(folder)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.3


def _expected(base_sd, factors, scalings, transposed=(), replaced=None):
    """fp64: W + scaling * B @ A (transposed for a Conv1D weight or an embedding), rounded once to W's dtype."""
    out = dict(base_sd)
    for module, f in factors.items():
        A, B = (f[1], f[2]) if f[0] == "embedding" else f
        delta = B.double() @ A.double()
        if f[0] == "embedding" or module in transposed:
            delta = delta.T
        W = base_sd[f"{module}.weight"]
        out[f"{module}.weight"] = (W.double() + scalings[module] * delta).to(W.dtype)
    out.update(replaced or {})
    return out


def _check_merged(got, want, dtype_tol):
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == want[n].dtype, n
        if want[n].dtype == torch.float32:
            assert torch.allclose(got[n].double(), want[n].double(), rtol=1e-6, atol=1e-6), n
        else:  # rounded once from fp32 here, from fp64 there: at most one unit in the last place apart
            diff = (got[n].double() - want[n].double()).abs()
            assert (diff <= dtype_tol * want[n].double().abs().clamp_min(1e-3)).all(), n


def test_a_hand_written_adapter_merges_to_w_plus_scaled_b_a(fx, tmp_path, capsys):
    """Llama (fp32 and bf16): a rank pattern and an alpha pattern, an embedding LoRA, a replaced head
    (modules_to_save); `average` of the adapter alone is its folded weights. Named as the adapter folder (its
    config's base), as base+adapter, and in YAML as base_model."""
    base = fx["llama"]
    base_sd = load_file(os.path.join(base, "model.safetensors"))
    factors = {"model.layers.0.self_attn.q_proj": (_rand(2, 32, seed=1), _rand(32, 2, seed=2)),
               "model.layers.1.self_attn.v_proj": (_rand(4, 32, seed=3), _rand(16, 4, seed=4)),  # k/v: 16 wide
               "model.layers.1.mlp.down_proj": (_rand(2, 48, seed=5), _rand(32, 2, seed=6)),
               "model.embed_tokens": ("embedding", _rand(2, 100, seed=7), _rand(32, 2, seed=8))}
    head = _rand(*base_sd["lm_head.weight"].shape, seed=9)
    ad = _write_adapter(tmp_path / "ad", base, factors, {"lm_head.weight": head},
                        rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 5})
    scalings = {m: 3 / 2 for m in factors}
    scalings["model.layers.1.self_attn.v_proj"] = 3 / 4
    scalings["model.layers.1.mlp.down_proj"] = 5 / 2
    want = _expected(base_sd, factors, scalings, replaced={"lm_head.weight": head})
    for i, ref in enumerate((ad, f"{base}+{ad}")):
        out = tmp_path / f"out{i}"
        rc, err = _cli(["merge", "--method", "average", "--models", ref, "--out", out], capsys)
        assert rc == 0, err
        _check_merged(read_folder(out), want, 0)
    cfg = yaml.safe_load((out / "regmean_config.yml").read_text())
    assert cfg["models"][0]["model"] == f"{os.path.abspath(base)}+{os.path.abspath(ad)}"  # mergekit's syntax
    assert "with the LoRA adapter" in (out / "README.md").read_text()
    # task_arithmetic on the adapter as base_model: the other model's task vector added to the adapted weights
    y = tmp_path / "ta.yaml"
    y.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": ad,
                                 "models": [{"model": fx["llama1"], "weight": 0.5}]}))
    rc, err = _cli(["merge", y, "--out", tmp_path / "ta"], capsys)
    assert rc == 0, err
    other = load_file(os.path.join(fx["llama1"], "model.safetensors"))
    got = read_folder(tmp_path / "ta")
    for n in want:
        assert torch.allclose(got[n].double(), want[n].double() + 0.5 * (other[n].double() - want[n].double()),
                              rtol=1e-5, atol=1e-5), n
    # bf16 base, rsLoRA scaling: the sum in fp32, rounded once to bf16 (as peft's merge on an fp32 adapter)
    base16 = fx["llama_bf16"]
    sd16 = load_file(os.path.join(base16, "model.safetensors"))
    f16 = {"model.layers.0.mlp.up_proj": (_rand(2, 32, seed=11), _rand(48, 2, seed=12))}
    ad16 = _write_adapter(tmp_path / "ad16", base16, f16, use_rslora=True)
    rc, err = _cli(["merge", "--method", "average", "--models", ad16, "--out", tmp_path / "o16"], capsys)
    assert rc == 0, err
    _check_merged(read_folder(tmp_path / "o16"), _expected(sd16, f16, {m: 3 / math.sqrt(2) for m in f16}), 2 ** -8)


def test_an_adapter_bin_and_an_adapter_hub_id(fx, tmp_path, capsys, monkeypatch):
    """adapter_model.bin (read weights-only) merges as its safetensors twin; an adapter and its base found in the
    Hugging Face cache by Hub id, the model card naming both."""
    base = fx["llama"]
    factors = {"model.layers.1.self_attn.o_proj": (_rand(2, 32, seed=1), _rand(32, 2, seed=2))}
    ad = _write_adapter(tmp_path / "ad", base, factors)
    twin = _write_adapter(tmp_path / "twin", base, factors)
    sd = load_file(os.path.join(twin, "adapter_model.safetensors"))
    os.remove(os.path.join(twin, "adapter_model.safetensors"))
    torch.save(sd, os.path.join(twin, "adapter_model.bin"))
    for name, ref in (("st", ad), ("bin", twin)):
        rc, err = _cli(["merge", "--method", "average", "--models", ref, "--out", tmp_path / name], capsys)
        assert rc == 0, err
    a, b = read_folder(tmp_path / "st"), read_folder(tmp_path / "bin")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    for repo, src in (("org--base", base), ("org--lora", ad)):
        snap = cache / f"models--{repo}" / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in os.listdir(src):
            (snap / f).write_bytes((open(os.path.join(src, f), "rb")).read())
        (cache / f"models--{repo}" / "refs").mkdir()
        (cache / f"models--{repo}" / "refs" / "main").write_text(commit)
    cfg_path = cache / "models--org--lora" / "snapshots" / commit / "adapter_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), base_model_name_or_path="org/base")))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for i, ref in enumerate(("org/lora", "org/base+org/lora")):
        out = tmp_path / f"hub{i}"
        rc, err = _cli(["merge", "--method", "average", "--models", ref, "--out", out], capsys)
        assert rc == 0, err
        got = read_folder(out)
        assert all(torch.equal(got[n], a[n]) for n in a)
        card = (out / "README.md").read_text()
        assert "base_model:\n- org/base\n- org/lora\n" in card and "`org/base`, with the LoRA adapter `org/lora`" in card
        assert yaml.safe_load((out / "regmean_config.yml").read_text())["models"][0]["model"] == "org/base+org/lora"


def test_a_hand_written_adapter_on_gpt2_conv1d(fx, tmp_path, capsys):
    """GPT-2's Conv1D weights are stored [in, out]: B @ A is transposed (fan_in_fan_out), for the square c_proj
    (only the config's flag can say) and the [32, 96] c_attn alike."""
    base = fx["gpt2"]
    base_sd = load_file(os.path.join(base, "model.safetensors"))
    factors = {"transformer.h.0.attn.c_attn": (_rand(2, 32, seed=1), _rand(96, 2, seed=2)),
               "transformer.h.1.attn.c_proj": (_rand(2, 32, seed=3), _rand(32, 2, seed=4)),
               "transformer.h.1.mlp.c_fc": (_rand(2, 32, seed=5), _rand(128, 2, seed=6))}
    ad = _write_adapter(tmp_path / "ad", base, factors, fan_in_fan_out=True)
    rc, err = _cli(["merge", "--method", "average", "--models", ad, "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    want = _expected(base_sd, factors, {m: 1.5 for m in factors}, transposed=set(factors))
    _check_merged(read_folder(tmp_path / "o"), want, 0)


def test_adapters_refused_inassert_one_line_error(fx, tmp_path, capsys):
    base = fx["llama"]
    good = {"model.layers.0.self_attn.q_proj": (_rand(2, 32, seed=1), _rand(32, 2, seed=2))}
    cases = [
        ("dora", dict(factors=good, use_dora=True), ["DoRA (use_dora)", "merge_and_unload"]),
        ("prefix", dict(factors=good, peft_type="PREFIX_TUNING"), ["peft_type 'PREFIX_TUNING'", "only LORA"]),
        ("bias", dict(factors=good, lora_bias=True), ["LoRA biases"]),
        ("absent", dict(factors={"model.layers.7.self_attn.q_proj": good["model.layers.0.self_attn.q_proj"]}),
         ["model.layers.7.self_attn.q_proj.weight", "not a tensor of the base model"]),
        ("shape", dict(factors={"model.layers.0.self_attn.q_proj": (_rand(2, 48, seed=1), _rand(32, 2, seed=2))}),
         ["[32, 48]", "does not fit the base's [32, 32]"]),
        ("rank", dict(factors=good, r=8), ["rank 2", "r=8"]),
        ("vocab", dict(factors=good, replaced={"lm_head.weight": torch.zeros(120, 32)}), ["resized vocabulary"]),
        ("nobase", dict(factors=good, base_model_name_or_path=None), ["names no base model", "BASE+ADAPTER"]),
    ]
    for name, kw, needles in cases:
        factors, replaced = kw.pop("factors"), kw.pop("replaced", None)
        ad = _write_adapter(tmp_path / name, base, factors, replaced, **kw)
        out = tmp_path / f"out-{name}"
        rc, err = _cli(["merge", "--method", "average", "--models", ad, base, "--out", out], capsys)
        assert_one_line_error(rc, err, *needles)
        assert not out.exists() and not any(p.name.startswith(f".out-{name}") for p in tmp_path.iterdir())
        g = tmp_path / f"g-{name}.safetensors"
        rc, err = _cli(["grams", ad, "--data", fx["data"], "--out", g, "--no-progress"], capsys)
        assert_one_line_error(rc, err, *needles)
        assert not g.exists()
    rc, err = _cli(["merge", "--method", "average", "--models", f"{base}+{fx['llama1']}", "--out", tmp_path / "x"],
                   capsys)
    assert_one_line_error(rc, err, "is not a PEFT adapter folder", "adapter_config.json")


# -- against peft ---------------------------------------------------------------------------------------------
def _peft_adapter(base, folder, target_modules, seed, modules_to_save=None):
    """An adapter peft makes and saves on the model loaded from `base`, its lora_B (zero at peft's init) random;
    with the folder peft's merge_and_unload saves beside it (folder + "-merged")."""
    peft = pytest.importorskip("peft")
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=target_modules, modules_to_save=modules_to_save)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(folder)
    merged = pm.merge_and_unload()
    merged.save_pretrained(f"{folder}-merged")
    hf_tiny.make_tokenizer("gpt2" if "gpt2" in str(base) else "llama").save_pretrained(f"{folder}-merged")
    return str(folder), f"{folder}-merged"


@pytest.mark.parametrize("kind,targets,to_save", [
    ("llama", ["q_proj", "v_proj", "down_proj", "embed_tokens"], ["lm_head"]),
    ("gpt2", ["c_attn", "c_proj"], None)])
def test_peft_adapter_averages_as_peft_merged(fx, tmp_path, capsys, kind, targets, to_save):
    """(a): `average` of [adapter, plain model] equals the fp64 average of peft's merged weights and the plain."""
    ad, merged = _peft_adapter(fx[kind], tmp_path / "ad", targets, seed=5, modules_to_save=to_save)
    other = fx["llama1" if kind == "llama" else "gpt2_1"]
    rc, err = _cli(["merge", "--method", "average", "--models", ad, other, "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    got, a, b = read_folder(tmp_path / "o"), read_folder(merged), read_folder(other)
    assert set(got) == set(b)
    changed = 0
    for n in b:
        want = (a[n].double() + b[n].double()) / 2
        assert torch.allclose(got[n].double(), want, rtol=1e-6, atol=1e-7), n
        changed += not torch.equal(a[n], load_file(os.path.join(fx[kind], "model.safetensors"))[n])
    assert changed >= 4  # the adapter did change the base


def test_peft_adapter_grams_and_regmean_as_peft_merged(fx, tmp_path, capsys):
    """(c) `grams` on the adapter equals `grams` on peft's merged folder; (b) RegMean with those Grams merges the
    adapter as it merges peft's merged folder, and as the fp64 closed form on the Grams."""
    ad, merged = _peft_adapter(fx["llama"], tmp_path / "ad", ["q_proj", "k_proj", "up_proj"], seed=6)
    other = fx["llama1"]
    grams = {}
    for name, ref in (("ad", ad), ("merged", merged), ("other", other)):
        grams[name] = tmp_path / f"{name}.safetensors"
        rc, err = _cli(["grams", ref, "--data", fx["data"], "--out", grams[name], "--no-progress"], capsys)
        assert rc == 0, err
    ga, gm = load_grams(str(grams["ad"])), load_grams(str(grams["merged"]))
    assert ga.modules() == gm.modules()
    for m in ga.modules():
        assert torch.allclose(ga.gram(m), gm.gram(m), rtol=1e-5, atol=1e-6), m
    assert ga.metadata["model"] == "ad" and ga.metadata["base_model"] == "llama"
    outs = {}
    for name, ref in (("ad", ad), ("merged", merged)):
        outs[name] = tmp_path / f"rm-{name}"
        rc, err = _cli(["merge", "--models", ref, other, "--grams", grams["ad"], grams["other"], "--out",
                        outs[name]], capsys)
        assert rc == 0, err
    got, via_peft = read_folder(outs["ad"]), read_folder(outs["merged"])
    for n in via_peft:
        assert torch.allclose(got[n], via_peft[n], rtol=1e-5, atol=1e-6), n
    # --sequential (block by block from the folders, io.lora under it) and regmean++ (the same reader) alike
    seq = {}
    for name, ref in (("ad", ad), ("merged", merged)):
        seq[name] = tmp_path / f"seq-{name}.safetensors"
        rc, err = _cli(["grams", ref, "--data", fx["data"], "--out", seq[name], "--sequential", "--no-progress"],
                       capsys)
        assert rc == 0, err
    sa, sm = load_grams(str(seq["ad"])), load_grams(str(seq["merged"]))
    for m in sm.modules():
        assert torch.allclose(sa.gram(m), sm.gram(m), rtol=1e-5, atol=1e-6), m
        assert torch.allclose(sa.gram(m), gm.gram(m), rtol=1e-4, atol=1e-5), m
    pp = {}
    for name, ref in (("ad", ad), ("merged", merged)):
        pp[name] = tmp_path / f"pp-{name}"
        rc, err = _cli(["merge", "--method", "regmean++", "--models", ref, other, "--data", fx["data"], fx["data"],
                        "--out", pp[name]], capsys)
        assert rc == 0, err
    got_pp, want_pp = read_folder(pp["ad"]), read_folder(pp["merged"])
    assert set(got_pp) == set(want_pp)
    for n in want_pp:
        assert torch.allclose(got_pp[n], want_pp[n], rtol=1e-5, atol=1e-6), n
    go = load_grams(str(grams["other"]))
    a, b = read_folder(merged), read_folder(other)
    for mod in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        w = f"{mod}.weight"
        want = gram_merge([ga.gram(mod), go.gram(mod)], [a[w], b[w]], alpha=0.9)  # the default alpha
        assert rel_err(got[w], want) < 1e-5, mod


def test_peft_adapter_on_a_bf16_base_is_bit_exact(fx, tmp_path, capsys):
    """peft merges a bf16 base with its (upcast, fp32) adapter in fp32, rounded once to bf16; so does this."""
    peft = pytest.importorskip("peft")
    import transformers as T

    base = fx["llama_bf16"]
    torch.manual_seed(7)
    pm = peft.get_peft_model(T.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                             peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(tmp_path / "ad")
    loaded = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                            str(tmp_path / "ad"))
    want = loaded.merge_and_unload().state_dict()
    rc, err = _cli(["merge", "--method", "average", "--models", tmp_path / "ad", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    got = read_folder(tmp_path / "o")
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           load_file(os.path.join(base, "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"])
    assert all(torch.equal(got[n], want[n]) for n in got)
