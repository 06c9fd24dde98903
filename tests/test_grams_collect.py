import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

from regmean_fast.grams import GramsError, collect_grams  # noqa: E402
from regmean_fast.grams.collect import GramCollector, NonFiniteActivationError, find_linear_modules  # noqa: E402


def fp64_capture(model, batches, include_padding=False):
    """Independent oracle: forward hooks that keep every Linear/Conv1D input, then fp64 X^T X."""
    mods, _ = find_linear_modules(model)
    sums, counts, handles = {}, {}, []
    state = {}

    def make(name):
        def hook(mod, args, out):
            x = args[0].detach().double()
            m = state["mask"]
            if not include_padding and x.dim() == 3 and m is not None and x.shape[:2] == m.shape:
                rows = x[m.bool()]
            else:
                rows = x.reshape(-1, x.size(-1))
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + rows.size(0)
        return hook

    for n, m in mods:
        handles.append(m.register_forward_hook(make(n)))
    with torch.no_grad():
        for b in batches:
            state["mask"] = b.get("attention_mask")
            model(**b)
    for h in handles:
        h.remove()
    return sums, counts


def _check_against_oracle(model, batches, include_padding=False):
    gs = collect_grams(model, batches, include_padding=include_padding)
    ref, cnt = fp64_capture(model, batches, include_padding)
    assert set(gs.modules()) == set(ref)
    for m in gs.modules():
        G = gs.gram(m)
        assert G.dtype == torch.float32
        R = ref[m]
        err = (G.double() - R).abs().max() / R.abs().max()
        assert err < 1e-5, (m, float(err))
        assert gs.count(m) == cnt[m], m
    return gs


def _data(kind, n=10, bs=4, seed=0):
    model, tok = hf_tiny.make_model(kind, seed=seed)
    texts = hf_tiny.random_texts(n, seed=seed)
    return model, hf_tiny.batches_of(tok, texts, bs)


def test_bert_grams_and_sharing():
    model, batches = _data("bert-cls")
    assert any((b["attention_mask"] == 0).any() for b in batches)  # padding present
    gs = _check_against_oracle(model, batches)
    L = "bert.encoder.layer.0."
    q, k, v = (L + f"attention.self.{n}" for n in ("query", "key", "value"))
    assert gs.gram_key(k) == gs.gram_key(v) == gs.gram_key(q) == q
    assert gs.gram_key(L + "attention.output.dense") != q
    assert gs.groups()[q] == [q, k, v]
    # the pooler / classifier read one row per example: every row kept
    n_ex = sum(b["input_ids"].size(0) for b in batches)
    assert gs.count("bert.pooler.dense") == n_ex and gs.count("classifier") == n_ex
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert gs.count(q) == tokens
    assert len(gs.keys()) == 2 * 4 + 2  # per layer: qkv, attn out, intermediate, output; pooler; classifier


def test_bert_padding_included():
    model, batches = _data("bert")
    gs = _check_against_oracle(model, batches, include_padding=True)
    rows = sum(b["input_ids"].numel() for b in batches)
    assert gs.count("encoder.layer.0.attention.self.query") == rows
    assert gs.metadata["padding"] == "included"


def test_gpt2_conv1d():
    model, batches = _data("gpt2")
    gs = _check_against_oracle(model, batches)
    assert gs.is_conv1d("transformer.h.0.attn.c_attn") and gs.is_conv1d("transformer.h.0.mlp.c_fc")
    assert gs.fingerprint["weights"]["transformer.h.0.mlp.c_fc"] == [32, 128]  # Conv1D: [in, out]
    assert "lm_head" not in gs.modules()  # tied to the embeddings: not in the checkpoint
    assert gs.metadata["skipped_tied"] == ["lm_head"]


def test_llama_sharing_and_oracle():
    model, batches = _data("llama")
    gs = _check_against_oracle(model, batches)
    L = "model.layers.1."
    q = L + "self_attn.q_proj"
    assert [gs.gram_key(L + f"self_attn.{n}_proj") for n in "qkv"] == [q] * 3
    assert gs.gram_key(L + "mlp.up_proj") == L + "mlp.gate_proj"
    assert gs.gram_key(L + "mlp.down_proj") == L + "mlp.down_proj"
    assert len(gs.keys()) == 2 * 4 + 1  # qkv, o, gate/up, down per layer; lm_head
    fp = gs.fingerprint
    assert fp["model_type"] == "llama" and fp["architectures"] == ["LlamaForCausalLM"]
    assert fp["weights"][q] == [32, 32] and fp["weights"][L + "self_attn.k_proj"] == [16, 32]


def test_context_manager_and_plain_module():
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    xs = [torch.randn(4, 5) for _ in range(3)]
    with torch.no_grad(), collect_grams(net) as c:
        for x in xs:
            net(x)
    gs = c.gramset()
    X = torch.cat(xs).double()
    assert torch.allclose(gs.gram("0").double(), X.T @ X, rtol=1e-5, atol=1e-5)
    assert gs.count("0") == 12 and gs.count("2") == 12 and gs.dim("2") == 7
    assert gs.fingerprint["weights"] == {"0": [7, 5], "2": [3, 7]}


def test_plain_module_eval_no_grad_and_any_batch():
    """On a plain nn.Module in training mode, the context manager and the function both measure eval-mode
    inputs under no_grad and give the training mode back; batches may be dicts, tuples or tensors."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Dropout(0.5), torch.nn.Linear(7, 3)).train()
    xs = [torch.randn(4, 5) for _ in range(3)]
    with torch.no_grad():  # the oracle: dropout off, fp64
        H = torch.cat([torch.nn.functional.linear(x, net[0].weight, net[0].bias) for x in xs]).double()
    with collect_grams(net) as c:
        assert not net.training and not torch.is_grad_enabled()
        for x in xs:
            net(x)
    assert net.training and torch.is_grad_enabled()
    results = [c.gramset()] + [collect_grams(net, b) for b in (xs, [(x,) for x in xs], [{"input": x} for x in xs])]
    for gs in results:
        assert torch.allclose(gs.gram("2").double(), H.T @ H, rtol=1e-5, atol=1e-5)
        assert gs.count("2") == 12 and gs.metadata["examples"] == 12 and gs.metadata["tokens"] == 12
    assert net.training


def test_include_exclude_and_no_match():
    model, batches = _data("llama", n=4)
    gs = collect_grams(model, batches, include=r"layers\.0\.", exclude=r"down_proj")
    assert gs.modules() and all("layers.0." in m and "down_proj" not in m for m in gs.modules())
    with pytest.raises(GramsError, match="no nn.Linear"):
        GramCollector(model, include="nothing_matches_this")


def test_nonfinite_names_module():
    model, batches = _data("llama", n=4)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteActivationError, match="layers.0.mlp.down_proj"):
        collect_grams(model, batches)


def test_finite_inputs_whose_squares_overflow_are_named():
    """x = 1e20 is finite, but x^2 overflows fp32: the Gram is unusable, and the error says why."""
    lin = torch.nn.Linear(4, 2)
    x = torch.full((3, 4), 1e20)
    assert torch.isfinite(x).all()
    with pytest.raises(NonFiniteActivationError, match="squares overflow fp32"):
        collect_grams(lin, [x])


def test_saved_file_matches(tmp_path):
    from regmean_fast import load_grams

    model, batches = _data("bert-cls", n=6)
    c = GramCollector(model).run(batches)
    p = c.save(tmp_path / "g.safetensors", metadata={"note": "x"}, packed=True)
    gs, mem = load_grams(p, verify=True), c.gramset()
    assert gs.modules() == mem.modules() and gs.metadata["note"] == "x"
    for k in mem.keys():
        assert torch.equal(gs.gram(k), mem.gram(k)) and gs.count(k) == mem.count(k)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "gpt2", "bert-cls", "llama-cls"])
def test_causal_lms_skip_the_logits_and_keep_the_head_gram(kind):
    """A causal LM's statistics forward computes one position's logits (the head reads a [B, 1, d] slice),
    yet the head's Gram (untied heads) covers every real token: equal to the fp64 capture of a full forward.
    Classifiers and encoders run as they are."""
    model, batches = _data(kind)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen = []
    if head is not None:
        head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    _check_against_oracle(model, batches)  # the oracle's own forwards append full shapes after ours
    causal = kind in ("llama", "qwen2", "gemma3", "gpt2")
    assert bool(GramCollector(model).forward_kwargs) == causal
    if causal:
        assert all(s[1] == 1 for s in seen[:len(batches)]), seen
        assert all(s[1] > 1 for s in seen[len(batches):]), seen
