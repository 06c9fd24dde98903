import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

from regmean_fast import load_grams  # noqa: E402
from regmean_fast.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    f = root / "d.txt"
    f.write_text("\n".join(hf_tiny.random_texts(9, seed=5)) + "\n")
    return root, str(f)


def _grams(capsys, model_dir, data, out, *extra):
    rc = main(["grams", str(model_dir), "--data", data, "--out", str(out), "--batch-size", "4", "--no-progress",
               *map(str, extra)])
    err = capsys.readouterr().err
    assert rc == 0, err
    return load_grams(out, verify=True), err


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sequential_equals_whole_model(kind, data, tmp_path, capsys):
    root, d = data
    m = hf_tiny.save_tiny(tmp_path / kind, kind, max_shard_size="20KB")  # sharded checkpoint
    whole, _ = _grams(capsys, m, d, tmp_path / "whole.safetensors")
    seq, _ = _grams(capsys, m, d, tmp_path / "seq.safetensors", "--sequential")
    assert seq.modules() == whole.modules() and seq.groups() == whole.groups()
    assert seq.metadata["mode"] == "sequential" and seq.metadata["tokens"] == whole.metadata["tokens"]
    assert seq.metadata["examples"] == whole.metadata["examples"] == 9
    for k in whole.keys():
        assert seq.count(k) == whole.count(k), k
        torch.testing.assert_close(seq.gram(k), whole.gram(k), rtol=1e-5, atol=1e-5)
    assert "lm_head" in seq.modules()


def test_sequential_padding_included(data, tmp_path, capsys):
    root, d = data
    m = hf_tiny.save_tiny(tmp_path / "llama", "llama")
    whole, _ = _grams(capsys, m, d, tmp_path / "w.safetensors", "--include-padding")
    seq, _ = _grams(capsys, m, d, tmp_path / "s.safetensors", "--include-padding", "--sequential")
    for k in whole.keys():
        assert seq.count(k) == whole.count(k)
        torch.testing.assert_close(seq.gram(k), whole.gram(k), rtol=1e-5, atol=1e-5)


def test_sequential_falls_back(data, tmp_path, capsys):
    root, d = data
    m = hf_tiny.save_tiny(tmp_path / "gpt2", "gpt2")
    gs, err = _grams(capsys, m, d, tmp_path / "g.safetensors", "--sequential")
    assert "not available for this model" in err and gs.metadata["mode"] == "whole-model"
