"""Priority (b): the `merge` command, YAML + flags, and every bad input: one line, exit 2, no output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from test_merge_common import make_activations, make_models, read_folder, save_model, write_gram_files

from regmean_fast.cli import main


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _, models = make_models("llama", k=3, seed=11)
    mods, acts = make_activations(models[0], 3, seed=11)
    paths = [save_model(m, root / f"llama{i}") for i, m in enumerate(models)]
    grams = write_gram_files(models[0], mods, acts, root)
    _, bert = make_models("bert", k=1, seed=12)
    bmods, bacts = make_activations(bert[0], 1, seed=12)
    (root / "bg").mkdir()
    bert_path = save_model(bert[0], root / "bert")
    bert_grams = write_gram_files(bert[0], bmods, bacts, root / "bg")
    return {"root": root, "models": models, "paths": paths, "grams": grams, "bert": bert_path,
            "bert_grams": bert_grams, "mods": mods, "acts": acts}


def _no_output(out):
    out = str(out)
    parent = os.path.dirname(out)
    assert not os.path.exists(out) or not os.listdir(out), f"{out} was written"
    leftovers = [f for f in os.listdir(parent) if f.startswith("." + os.path.basename(out))]
    assert not leftovers, leftovers


def _fails(argv, capsys, match, out):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("regmean_fast: error: "), err
    assert match in err, err
    _no_output(out)
    return err


def test_cli_flags_and_yaml(fx, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["merge", "--models", *fx["paths"], "--grams", *fx["grams"], "--alpha", "0.8", "--out", str(out)]) == 0
    a = read_folder(out)
    cfg = {"method": "regmean", "models": [{"model": p, "grams": g, "weight": 1.0}
                                           for p, g in zip(fx["paths"], fx["grams"])],
           "parameters": {"alpha": 0.3, "normalization": "mean"}, "out_dtype": "float32"}
    y = tmp_path / "m.yaml"
    import yaml

    y.write_text(yaml.safe_dump(cfg))
    out2 = tmp_path / "b"
    assert main(["merge", str(y), "--alpha", "0.8", "--out", str(out2)]) == 0  # the flag overrides the file
    b = read_folder(out2)
    for n in a:
        assert torch.equal(a[n], b[n])
    out3 = tmp_path / "c"
    capsys.readouterr()
    assert main(["merge", str(y), "--out", str(out3), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["parameters"]["alpha"] == 0.3
    assert not torch.equal(read_folder(out3)["model.layers.0.self_attn.q_proj.weight"],
                           a["model.layers.0.self_attn.q_proj.weight"])


def test_cli_subprocess_exit_status(fx, tmp_path):
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "regmean_fast", "merge", "--models", *fx["paths"], "--grams",
                        *fx["grams"][:2], "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["regmean_fast: error: got 2 Gram files for 3 models"]
    _no_output(out)


def test_refuses_nonempty_output_and_input_folder(fx, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", "--models", *fx["paths"], "--grams", *fx["grams"], "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["merge", "--models", *fx["paths"], "--grams", *fx["grams"], "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    rc = main(["merge", "--models", *fx["paths"], "--grams", *fx["grams"], "--out", fx["paths"][0], "--force"])
    assert rc == 2 and "input" in capsys.readouterr().err
    assert os.path.exists(os.path.join(fx["paths"][0], "model.safetensors"))


def _args(fx, out, models=None, grams=None, extra=()):
    return ["merge", "--models", *(models or fx["paths"]), "--grams", *(grams or fx["grams"]), "--out", str(out),
            *extra]


def test_bad_architecture_and_shapes(fx, tmp_path, capsys):
    out = tmp_path / "o"
    _fails(_args(fx, out, models=[fx["paths"][0], fx["bert"]], grams=fx["grams"][:2]), capsys,
           "different architecture", out)
    # same architecture, other shapes
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    p = save_model(tf.LlamaForCausalLM(cfg), tmp_path / "wide")
    _fails(_args(fx, out, models=[fx["paths"][0], p], grams=fx["grams"][:2]), capsys, "has shape", out)


def test_missing_or_corrupt_shards_and_index(fx, tmp_path, capsys):
    out = tmp_path / "o"
    sharded = str(tmp_path / "sharded")
    fx["models"][1].save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    models = [fx["paths"][0], sharded, fx["paths"][2]]
    assert main(_args(fx, tmp_path / "ok", models=models)) == 0  # sharded input works
    os.rename(os.path.join(sharded, files[1]), os.path.join(sharded, "x"))
    _fails(_args(fx, out, models=models), capsys, "is missing", out)
    os.rename(os.path.join(sharded, "x"), os.path.join(sharded, files[1]))
    with open(os.path.join(sharded, files[1]), "r+b") as f:  # truncate a shard
        f.truncate(os.path.getsize(os.path.join(sharded, files[1])) - 10)
    _fails(_args(fx, out, models=models), capsys, "truncated", out)
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        f.write("{not json")
    _fails(_args(fx, out, models=models), capsys, "corrupt index", out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage here!!}")
    _fails(_args(fx, out, models=[fx["paths"][0], str(bad), fx["paths"][2]]), capsys, "corrupt", out)


def _rewrite_gram(src, dst, fn):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, "pt") as f:
        meta = f.metadata()
        ts = {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(k for k in ts if k.startswith("gram."))[0]
    ts[key] = fn(ts[key])
    save_file(ts, dst, metadata=meta)
    return dst


def test_bad_gram_files(fx, tmp_path, capsys):
    out = tmp_path / "o"
    _fails(_args(fx, out, grams=[fx["grams"][0], fx["bert_grams"][0], fx["grams"][2]]), capsys,
           "made on another model", out)
    _fails(_args(fx, out, grams=fx["grams"][:2]), capsys, "got 2 Gram files for 3 models", out)

    def nan(t):
        t = t.clone()
        t[0, 0] = float("nan")
        return t

    def asym(t):
        t = t.clone()
        t[0, 1] += 1000.0
        return t

    for fn, msg in ((nan, "non-finite"), (asym, "not symmetric")):
        bad = _rewrite_gram(fx["grams"][1], str(tmp_path / f"{msg[:4]}.safetensors"), fn)
        err = _fails(_args(fx, out, grams=[fx["grams"][0], bad, fx["grams"][2]]), capsys, msg, out)
        assert err.count(os.path.basename(bad)) == 1, err  # the file named once
    # a Gram of the wrong size in a file that claims the right model
    bad = _rewrite_gram(fx["grams"][1], str(tmp_path / "wrong.safetensors"), lambda t: torch.eye(t.shape[0] + 3))
    err = _fails(_args(fx, out, grams=[fx["grams"][0], bad, fx["grams"][2]]), capsys, "wrong.safetensors", out)
    assert ("shape" in err or "size" in err) and err.count("wrong.safetensors") == 1, err


def test_bad_config(fx, tmp_path, capsys):
    out = tmp_path / "o"
    y = tmp_path / "c.yaml"
    base = {"models": [{"model": p, "grams": g} for p, g in zip(fx["paths"], fx["grams"])]}
    for extra, msg in (({"bogus": 1}, "unknown key(s) bogus"), ({"method": "slurp"}, "unknown merge method"),
                       ({"parameters": {"alpha": 1.5}}, "alpha must be in [0, 1]"),
                       ({"parameters": {"beta": 1}}, "unknown parameter(s) for method regmean: beta"),
                       ({"method": "ties"}, "needs base_model"),
                       ({"method": "passthrough"}, "merge method passthrough (mergekit) is not supported")):
        import yaml

        y.write_text(yaml.safe_dump({**base, **extra}))
        _fails(["merge", str(y), "--out", str(out)], capsys, msg, out)
    for extra, msg in (({"parameters": {"alpha": True}}, "alpha must be a number, got True"),
                       ({"models": [dict(m, weight=True) for m in base["models"]]}, "weight must be a number")):
        y.write_text(yaml.safe_dump({**base, **extra}))  # YAML booleans are not numbers
        _fails(["merge", str(y), "--out", str(out)], capsys, msg, out)
    y.write_text(yaml.safe_dump({"models": [{"model": fx["paths"][0], "gram": "x"}]}))
    _fails(["merge", str(y), "--out", str(out)], capsys, "unknown key(s) gram", out)
    _fails(_args(fx, out, extra=["--alpha", "-0.1"]), capsys, "alpha must be in [0, 1]", out)
    _fails(_args(fx, out, extra=["--shard-size", "0"]), capsys, "shard_size: size must be positive", out)
    _fails(_args(fx, out, extra=["--max-memory", "lots"]), capsys, "max_memory: not a size", out)
    _fails(_args(fx, out, extra=["--weights", "1", "-1", "1"]), capsys, "non-negative", out)
    _fails(_args(fx, out, extra=["--weights", "0", "0", "0"]), capsys, "must not all be zero", out)


def test_full_disk(fx, tmp_path, capsys, monkeypatch):
    import shutil

    from regmean_fast.io import safetensors_file

    out = tmp_path / "o"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    _fails(_args(fx, out), capsys, "not enough free disk space", out)
    # room for the weights but not for the rest: the message's numbers say why
    weights = sum(t.numel() * t.element_size() for t in read_folder(fx["paths"][0]).values())
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=weights + 2**19))
    err = _fails(_args(fx, out), capsys, "not enough free disk space", out)
    need, free = (float(x) for x in re.search(r"need ([\d.]+) MiB, ([\d.]+) MiB free", err).groups())
    assert need > free, err
    monkeypatch.setattr(shutil, "disk_usage", real)
    calls = {"n": 0}
    orig = safetensors_file.StreamingShardWriter._write

    def full(self, data):  # the disk fills up in the middle of writing
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(28, "No space left on device")
        return orig(self, data)

    monkeypatch.setattr(safetensors_file.StreamingShardWriter, "_write", full)
    _fails(_args(fx, out), capsys, "no space left", out)


def test_saved_config_reproduces_the_merge_from_anywhere(fx, tmp_path, monkeypatch, capsys):
    """regmean_config.yml in the output: given relative paths on the command line, rerunning it from
    another folder (its paths would be taken relative to the file's folder) gives the same shards."""
    import yaml

    root = fx["root"]
    monkeypatch.chdir(root)
    rel_models = [os.path.basename(p) for p in fx["paths"]]
    rel_grams = [os.path.basename(g) for g in fx["grams"]]
    a = tmp_path / "a"
    assert main(["merge", "--models", *rel_models, "--grams", *rel_grams, "--alpha", "0.7", "--shard-size", "30KB",
                 "--allow-missing-grams", "--out", str(a)]) == 0
    saved = yaml.safe_load((a / "regmean_config.yml").read_text())
    assert saved["parameters"] == {"alpha": 0.7, "normalization": "mean"}  # every parameter, defaults included
    assert saved["allow_missing_grams"] is True
    assert [m["model"] for m in saved["models"]] == [str(root / m) for m in rel_models]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    b = tmp_path / "b"
    assert main(["merge", str(a / "regmean_config.yml"), "--out", str(b)]) == 0, capsys.readouterr().err
    shards = sorted(f for f in os.listdir(a) if f.endswith(".safetensors"))
    assert len(shards) > 1 and shards == sorted(f for f in os.listdir(b) if f.endswith(".safetensors"))
    for f in shards + ["model.safetensors.index.json"]:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_help_teaches(capsys):
    """`merge --help` shows the defaults and an example YAML that is a valid configuration."""
    import yaml

    from regmean_fast.merge.config import config_from_dict

    with pytest.raises(SystemExit) as e:
        main(["merge", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    for s in ("(default 1.0)", "(default mean)", "(default 1.0: all, as mergekit)", "(default regmean)", "--resume",
              "docs/merge.md"):
        assert s in flat, s
    block = text.split("example CONFIG.yaml", 1)[1].split("\n\n", 2)[1]
    cfg = config_from_dict(yaml.safe_load(block)).validate(require_paths=False)
    assert cfg.method == "regmean" and len(cfg.models) == 2 and cfg.parameters == {"alpha": 0.9}


def test_gram_files_given_in_the_wrong_order_are_warned(fx, tmp_path, capsys):
    """Same architecture, so only the Gram files' provenance (the model folder's name) tells that
    --grams were given in another order than --models: a warning naming both, in the report too."""
    from test_merge_common import fingerprint, grams_from_acts

    from regmean_fast.grams.fileformat import save_grams

    named = []
    for i, a in enumerate(fx["acts"]):
        grams, counts, module_map, conv = grams_from_acts(fx["mods"], a)
        named.append(str(tmp_path / f"named{i}.safetensors"))
        save_grams(named[-1], grams, counts, module_map, fingerprint(fx["models"][0]),
                   {"tool": "test", "model": os.path.basename(fx["paths"][i])}, conv1d=conv)
    capsys.readouterr()
    assert main(_args(fx, tmp_path / "ok", grams=named, extra=["--json"])) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []
    assert main(_args(fx, tmp_path / "swapped", grams=[named[1], named[0], named[2]])) == 0
    warned = [w for w in capsys.readouterr().err.splitlines() if "check the order" in w]
    assert len(warned) == 2 and "named1.safetensors" in warned[0] and "paired with model 0 (llama0)" in warned[0]
    report = json.load(open(tmp_path / "swapped" / "merge_report.json"))
    assert [w for w in report["warnings"] if "check the order" in w] == [w[len("warning: "):] for w in warned]


def test_every_method_flags_equal_yaml(fx, tmp_path):
    """Each method through flags and through a YAML file (with the same values) writes the same bytes;
    the formulas themselves are checked in test_merge_methods.py."""
    import yaml

    base, _ = make_models("llama", k=0, seed=11)
    bp = save_model(base, tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    fisher = [{n: torch.rand(t.shape, generator=g) for n, t in m.state_dict().items()} for m in fx["models"]]
    (tmp_path / "fg").mkdir()
    fgrams = write_gram_files(fx["models"][0], fx["mods"], fx["acts"], tmp_path / "fg", fisher=fisher)
    cases = (("regmean", ["--alpha", "0.6", "--normalization", "sum"], {"alpha": 0.6, "normalization": "sum"}, None),
             ("average", [], {}, None),
             ("task_arithmetic", ["--scaling", "0.4", "--param", "normalize=true"], {"scaling": 0.4, "normalize": True},
              bp),
             ("ties", ["--density", "0.5", "--scaling", "0.9"], {"density": 0.5, "scaling": 0.9}, bp),
             ("fisher", ["--param", "fisher_floor=1e-3"], {"fisher_floor": 1e-3}, None))
    for method, flags, params, base_model in cases:
        grams = fgrams if method == "fisher" else fx["grams"]
        needs = method in ("regmean", "fisher")
        argv = ["merge", "--models", *fx["paths"], "--weights", "1", "2", "3", "--method", method, *flags,
                "--out", str(tmp_path / f"{method}_flags")]
        argv += ["--grams", *grams] if needs else []
        argv += ["--base-model", base_model] if base_model else []
        assert main(argv) == 0, method
        cfg = {"method": method, "parameters": params,
               "models": [dict({"model": p, "weight": w}, **({"grams": gp} if needs else {}))
                          for p, w, gp in zip(fx["paths"], [1, 2, 3], grams)]}
        if base_model:
            cfg["base_model"] = base_model
        y = tmp_path / f"{method}.yaml"
        y.write_text(yaml.safe_dump(cfg))
        assert main(["merge", str(y), "--out", str(tmp_path / f"{method}_yaml")]) == 0, method
        a, b = read_folder(tmp_path / f"{method}_flags"), read_folder(tmp_path / f"{method}_yaml")
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a), method
        rep = json.load(open(tmp_path / f"{method}_flags" / "merge_report.json"))
        assert rep["method"] == method and all(rep["parameters"][k] == v for k, v in params.items()), method


def test_unwritable_output_folder(fx, tmp_path, capsys, monkeypatch):
    """An output location that cannot be written (read-only file system, no permission): one line, exit 2."""
    import errno

    real = os.mkdir

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", read_only)
    out = tmp_path / "o"
    _fails(_args(fx, out), capsys, "cannot write the output in", out)


def test_mergekit_linear_is_the_weighted_average(fx, tmp_path, capsys):
    """mergekit's `merge_method: linear` (normalised by default) is our average: the same bytes as --method
    average with the same weights; `normalize: false` is the plain weighted sum (fp64 definition)."""
    import yaml

    models = [{"model": p, "weight": w} for p, w in zip(fx["paths"], [1, 2, 3])]
    assert main(["merge", "--models", *fx["paths"], "--weights", "1", "2", "3", "--method", "average",
                 "--out", str(tmp_path / "avg")]) == 0
    for i, params in enumerate(({}, {"normalize": True})):
        y = tmp_path / f"linear{i}.yaml"
        y.write_text(yaml.safe_dump({"merge_method": "linear", "models": models, "parameters": params}))
        assert main(["merge", str(y), "--out", str(tmp_path / f"lin{i}")]) == 0
        a, b = read_folder(tmp_path / "avg"), read_folder(tmp_path / f"lin{i}")
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    y = tmp_path / "sum.yaml"
    y.write_text(yaml.safe_dump({"merge_method": "linear", "models": models, "parameters": {"normalize": False}}))
    assert main(["merge", str(y), "--out", str(tmp_path / "sum")]) == 0
    got, ins = read_folder(tmp_path / "sum"), [read_folder(p) for p in fx["paths"]]
    for n in got:
        exp = sum(w * m[n].double() for w, m in zip([1, 2, 3], ins))
        torch.testing.assert_close(got[n].double(), exp, atol=1e-6, rtol=1e-6)


def test_custom_code_model_output_loads(fx, tmp_path):
    """A model with custom code (config.json auto_map, trust_remote_code): its *.py files go with the output,
    which then loads and runs with trust_remote_code; the code is the donor's, byte for byte."""
    import shutil

    import transformers

    code = ("from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
            "class TinyCustomConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n\n\n"
            "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n")
    paths = []
    for i, p in enumerate(fx["paths"][:2]):
        d = tmp_path / f"custom{i}"
        shutil.copytree(p, d)
        (d / "tiny_custom.py").write_text(code)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="tiny_custom", architectures=["TinyCustomForCausalLM"],
                   auto_map={"AutoConfig": "tiny_custom.TinyCustomConfig",
                             "AutoModelForCausalLM": "tiny_custom.TinyCustomForCausalLM"})
        (d / "config.json").write_text(json.dumps(cfg))
        paths.append(str(d))
    out = tmp_path / "out"
    assert main(["merge", "--models", *paths, "--method", "average", "--out", str(out)]) == 0
    assert (out / "tiny_custom.py").read_text() == code
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_flags_switch_a_yaml_boolean_off(fx, tmp_path):
    """--no-allow-missing-grams overrides a YAML's allow_missing_grams: true; no flag keeps the file's value."""
    import yaml

    from regmean_fast.cli import build_parser
    from regmean_fast.merge.command import config_from_args

    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"models": [{"model": p, "grams": g} for p, g in zip(fx["paths"], fx["grams"])],
                                 "allow_missing_grams": True}))
    for flags, expect in (([], True), (["--no-allow-missing-grams"], False), (["--allow-missing-grams"], True)):
        args = build_parser().parse_args(["merge", str(y), "--out", str(tmp_path / "o"), *flags])
        assert config_from_args(args).allow_missing_grams is expect, flags
