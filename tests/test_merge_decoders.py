"""Real decoder architectures through both commands: tiny random Llama (tied embeddings), Qwen2 and Gemma-3
(q/k norms, scaled embeddings, sliding-window layers, tied head) built from configs. Three 'fine-tuned' copies
of one model, their statistics through `grams` (one of them --sequential), the merge through `merge`: every
linear weight equals the fp64 least-squares RegMean solution on activations captured independently (forward
hooks, one unpadded example at a time), every other tensor the average, the tied head stays tied, and the
merged folder loads and generates."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402
from test_merge_common import lstsq_merge, read_folder  # noqa: E402

from regmean_fast.cli import main  # noqa: E402

K = 3
ALPHA = 0.9


def _copies(kind, root, **overrides):
    """K copies of one random model, each with its own noise, saved with the tokenizer."""
    base, tok = hf_tiny.make_model(kind, seed=0, **overrides)
    paths = []
    for i in range(K):
        m, _ = hf_tiny.make_model(kind, seed=0, **overrides)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        path = str(root / f"m{i}")
        m.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        paths.append(path)
    return paths


def _activations(model_dir, texts):
    """fp64 inputs of every nn.Linear whose weight is a parameter of its own (a tied head is not), one
    unpadded example at a time."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    acts: dict = {}

    def hook(name):
        def f(mod, args):
            acts.setdefault(name, []).append(args[0].detach().double().reshape(-1, args[0].size(-1)))
        return f

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
          if isinstance(m, torch.nn.Linear) and not (tied and m is model.get_output_embeddings())]
    with torch.no_grad():
        for t in texts:
            model(**tok([t], return_tensors="pt"))
    for h in hs:
        h.remove()
    return {n: torch.cat(x) for n, x in acts.items()}


@pytest.mark.parametrize("kind,overrides", [("llama", {"tie_word_embeddings": True}), ("qwen2", {}),
                                            ("gemma3", {})], ids=["llama-tied", "qwen2", "gemma3"])
def test_decoder_merge_through_both_commands(kind, overrides, tmp_path, capsys):
    import transformers

    paths = _copies(kind, tmp_path, **overrides)
    texts = [hf_tiny.random_texts(8, seed=10 + i, min_words=3) for i in range(K)]
    grams = []
    for i, (p, tx) in enumerate(zip(paths, texts)):
        data = tmp_path / f"d{i}.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tx))
        out = tmp_path / f"g{i}.safetensors"
        rc = main(["grams", p, "--data", str(data), "--out", str(out), "--batch-size", "3", "--no-progress",
                   *(["--sequential"] if i == 1 else [])])
        assert rc == 0, capsys.readouterr().err
        grams.append(str(out))
    merged = tmp_path / "merged"
    rc = main(["merge", "--models", *paths, "--grams", *grams, "--out", str(merged), "--alpha", str(ALPHA)])
    assert rc == 0, capsys.readouterr().err

    got = read_folder(merged)
    inputs = [read_folder(p) for p in paths]
    assert set(got) == set(inputs[0])  # nothing added, nothing dropped (a tied head is not written)
    acts = [_activations(p, tx) for p, tx in zip(paths, texts)]
    linear = set(acts[0])
    assert linear and all(set(a) == linear for a in acts)
    for name in got:
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in linear:
            want = lstsq_merge([sd[name] for sd in inputs], [a[module] for a in acts], alpha=ALPHA)
        else:  # embeddings, norms: the average
            want = sum(sd[name].double() for sd in inputs) / K
        err = float((got[name].double() - want).abs().max() / want.abs().max())
        assert err < 1e-4, (name, err)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if cfg.tie_word_embeddings:
        assert "lm_head.weight" not in got
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tok = transformers.AutoTokenizer.from_pretrained(str(merged))
    ids = tok(["the cat"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.isfinite(model(**ids).logits).all()
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
