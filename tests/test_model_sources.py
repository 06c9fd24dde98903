"""Models named as users name them, for `merge` and `grams`: a local folder, a Hugging Face Hub id
(`org/name`, `org/name@revision`) found in huggingface_hub's cache offline (a fake cache laid out as
huggingface_hub lays it out: models--org--name/snapshots/<commit>, refs/main), and folders holding only
pytorch_model.bin (single or sharded), read with torch.load(weights_only=True); a pickle with code is refused."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

import hf_tiny
from test_merge_common import assert_one_line_error, read_folder

from regmean_fast import load_grams
from regmean_fast.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Code:
    def __reduce__(self):  # what a malicious checkpoint does: call something on load
        return (os.getcwd, ())


def _copy_non_weights(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and not f.endswith(".index.json"):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    return str(dst)


def _bin_twin(src, dst, shards=1):
    """The same weights as pytorch_model.bin (or shards of it with pytorch_model.bin.index.json)."""
    _copy_non_weights(src, dst)
    sd = load_file(os.path.join(src, "model.safetensors"))
    if shards == 1:
        torch.save(sd, os.path.join(dst, "pytorch_model.bin"))
        return str(dst)
    names = list(sd)
    weight_map = {}
    for j in range(shards):
        fname = f"pytorch_model-{j + 1:05d}-of-{shards:05d}.bin"
        part = {n: sd[n] for n in names[j::shards]}
        torch.save(part, os.path.join(dst, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(dst, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(dst)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    st = [hf_tiny.save_tiny(root / f"st{i}", "llama", seed=i) for i in range(3)]
    cache = root / "hub"
    for i, name in enumerate(("tiny-a", "tiny-b")):  # huggingface_hub's layout
        repo = cache / f"models--org--{name}"
        shutil.copytree(st[i], repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)
    texts = hf_tiny.random_texts(9, seed=2)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {"root": root, "st": st, "cache": str(cache), "data": str(data),
            "bin": [_bin_twin(st[0], root / "bin0"), _bin_twin(st[1], root / "bin1", shards=3),
                    _bin_twin(st[2], root / "bin2")]}


def _merge(cfg, out, capsys):
    y = out.parent / (out.name + ".yaml")
    y.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["merge", str(y), "--out", str(out)])
    return rc, capsys.readouterr().err


def test_hub_ids_resolve_through_the_cache_offline(fx, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", fx["cache"])
    rc, err = _merge({"merge_method": "linear", "models": fx["st"][:2]}, tmp_path / "local", capsys)
    assert rc == 0, err
    for b_ref in ("org/tiny-b", f"org/tiny-b@{COMMIT}", "org/tiny-b@main"):
        out = tmp_path / f"hub{b_ref.count('@')}{len(b_ref)}"
        rc, err = _merge({"merge_method": "linear", "models": ["org/tiny-a", b_ref]}, out, capsys)
        assert rc == 0, err
        a, b = read_folder(tmp_path / "local"), read_folder(out)
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    card = (out / "README.md").read_text()
    assert "base_model:\n- org/tiny-a\n- org/tiny-b\n" in card and "https://github.com/)" not in card
    assert [m["model"] for m in yaml.safe_load((out / "regmean_config.yml").read_text())["models"]] == \
        ["org/tiny-a", "org/tiny-b@main"]  # the saved config names them as the user did
    local_card = (tmp_path / "local" / "README.md").read_text()
    assert "base_model" not in local_card  # local folders: no Hub link invented
    rc, err = _merge({"merge_method": "linear", "models": ["org/tiny-a", "org/absent@v2"]}, tmp_path / "x", capsys)
    assert_one_line_error(rc, err, "org/absent@v2", "not in the Hugging Face cache", fx["cache"],
              "hf download org/absent --revision v2")
    assert not (tmp_path / "x").exists()
    rc, err = _merge({"merge_method": "linear", "models": ["org/tiny-a+org/adapter", "org/tiny-b"]},
                     tmp_path / "x", capsys)
    assert_one_line_error(rc, err, "org/adapter", "not in the Hugging Face cache")  # base+adapter: both sides looked up


def test_grams_of_a_hub_id_and_a_bin_twin_equal_the_folders(fx, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", fx["cache"])
    outs = []
    for ref in (fx["st"][0], "org/tiny-a", fx["bin"][0]):  # the folder, its Hub id, its .bin twin
        out = tmp_path / f"g{len(outs)}.safetensors"
        capsys.readouterr()
        assert main(["grams", ref, "--data", fx["data"], "--out", str(out), "--no-progress"]) == 0, \
            capsys.readouterr().err
        outs.append(load_grams(str(out)))
    ref = outs[0]
    for gs in outs[1:]:
        assert gs.modules() == ref.modules()
        for m in ref.modules():
            assert torch.equal(gs.gram(m), ref.gram(m)), m
    assert outs[1].metadata.get("hub_id") == "org/tiny-a"


def test_bin_checkpoints_equal_their_safetensors_twins(fx, tmp_path, capsys):
    cfg_st = {"merge_method": "task_arithmetic", "base_model": fx["st"][2], "models": fx["st"][:2],
              "parameters": {"lambda": 0.8}}
    cfg_bin = {"merge_method": "task_arithmetic", "base_model": fx["bin"][2], "models": fx["bin"][:2],
               "parameters": {"lambda": 0.8}}
    for name, cfg in (("st", cfg_st), ("bin", cfg_bin)):
        rc, err = _merge(cfg, tmp_path / name, capsys)
        assert rc == 0, err
    a, b = read_folder(tmp_path / "st"), read_folder(tmp_path / "bin")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_a_pickle_with_code_is_refused(fx, tmp_path, capsys):
    evil = _copy_non_weights(fx["st"][0], tmp_path / "evil")
    sd = load_file(os.path.join(fx["st"][0], "model.safetensors"))
    torch.save({**sd, "extra": _Code()}, os.path.join(evil, "pytorch_model.bin"))
    rc, err = _merge({"merge_method": "linear", "models": [evil, fx["st"][1]]}, tmp_path / "m", capsys)
    assert_one_line_error(rc, err, "refused", "pickle", "weights_only")
    assert not (tmp_path / "m").exists()
    capsys.readouterr()
    rc = main(["grams", evil, "--data", fx["data"], "--out", str(tmp_path / "g.safetensors"), "--no-progress"])
    assert_one_line_error(rc, capsys.readouterr().err, "refused", "pickle")
    assert not (tmp_path / "g.safetensors").exists()
