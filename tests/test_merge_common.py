"""Helpers shared by the tests/test_merge_*.py files (no tests here): tiny random models built from
configs, synthetic activations and their Grams, Gram files, and the fp64 least-squares oracle."""

from __future__ import annotations

import os
import re

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

QKV = re.compile(r"\.(q_proj|k_proj|v_proj|query|key|value)$")
GATE_UP = re.compile(r"\.(gate_proj|up_proj)$")


def tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    if arch == "bert":
        return tf.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=100, max_position_embeddings=64)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    raise ValueError(arch)


def model_class(arch: str):
    import transformers as tf

    return {"llama": tf.LlamaForCausalLM, "bert": tf.BertModel, "gpt2": tf.GPT2LMHeadModel}[arch]


def make_models(arch: str, k: int = 3, seed: int = 0, noise: float = 0.05):
    """k 'fine-tuned' copies of one random init (init + per-model noise)."""
    torch.manual_seed(seed)
    base = model_class(arch)(tiny_config(arch)).eval()
    models = []
    for i in range(k):
        m = model_class(arch)(tiny_config(arch)).eval()
        m.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(seed * 100 + i + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g))
        models.append(m)
    return base, models


def save_model(model, path):
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def linear_modules(model):
    """[(module name, is_conv1d)] for every nn.Linear and transformers Conv1D."""
    out = []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out.append((n, False))
        elif type(m).__name__ == "Conv1D":
            out.append((n, True))
    return out


def share_key(module: str) -> str:
    if QKV.search(module):
        return QKV.sub(".qkv_in", module)
    if GATE_UP.search(module):
        return GATE_UP.sub(".gate_up_in", module)
    return module


def d_in(model, module, conv1d):
    w = model.get_submodule(module).weight
    return w.shape[0] if conv1d else w.shape[1]


def make_activations(model, k: int, seed: int = 0, exclude=()):
    """Per model i, per shared key: random activations X [n_i, d] (n_i > d, columns of varied scale)."""
    mods = [(m, c) for m, c in linear_modules(model) if m not in exclude]
    acts = []
    for i in range(k):
        g = torch.Generator().manual_seed(1000 + seed * 10 + i)
        per = {}
        for m, c in mods:
            key = share_key(m)
            if key not in per:
                d = d_in(model, m, c)
                n = 2 * d + 8 * i + 5
                scale = torch.rand(d, generator=g) * 2 + 0.2
                per[key] = torch.randn(n, d, generator=g, dtype=torch.float64) * scale.double()
        acts.append(per)
    return mods, acts


def grams_from_acts(mods, acts_i):
    """(grams key -> fp32 raw sum, counts, module_map, conv1d list) for one model."""
    grams = {key: (X.T @ X).float() for key, X in acts_i.items()}
    counts = {key: X.shape[0] for key, X in acts_i.items()}
    module_map = {m: share_key(m) for m, _ in mods}
    conv = [m for m, c in mods if c]
    return grams, counts, module_map, conv


def fingerprint(model):
    return {"model_type": model.config.model_type, "architectures": [type(model).__name__],
            "weights": {m: list(model.get_submodule(m).weight.shape) for m, _ in linear_modules(model)}}


def write_gram_files(model, mods, acts, folder, fisher=None):
    """One real Gram file per model via regmean_fast.grams.fileformat.save_grams; returns their paths."""
    from regmean_fast.grams.fileformat import save_grams

    paths = []
    fp = fingerprint(model)
    fp["weights"] = {m: v for m, v in fp["weights"].items() if m in dict(mods)}
    for i, a in enumerate(acts):
        grams, counts, module_map, conv = grams_from_acts(mods, a)
        p = os.path.join(str(folder), f"grams{i}.safetensors")
        save_grams(p, grams, counts, module_map, fp, {"tool": "test"}, conv1d=conv,
                   fisher=None if fisher is None else fisher[i])
        paths.append(p)
    return paths


def lstsq_merge(weights, acts, alpha=1.0, coeffs=None, normalization="mean"):
    """The fp64 least-squares formulation (design.md) for one module: weights[i] [d_out, d_in]."""
    k = len(weights)
    c = [1.0 / k] * k if coeffs is None else [x / sum(coeffs) for x in coeffs]
    rows, rhs = [], []
    for W, X, ci in zip(weights, acts, c):
        W = W.double()
        s = 1.0 / X.shape[0] ** 0.5 if normalization == "mean" else 1.0
        if alpha > 0:
            R = (ci * alpha) ** 0.5 * s * X
            rows.append(R)
            rhs.append(R @ W.T)
        if alpha < 1:
            D = (X * X).sum(0) * s * s
            R = torch.diag(((ci * (1 - alpha)) * D).sqrt())
            rows.append(R)
            rhs.append(R @ W.T)
    A = torch.cat(rows)
    B = torch.cat(rhs)
    return torch.linalg.lstsq(A, B, driver="gelsd").solution.T


def read_folder(path):
    """All tensors of a merged HF folder (sharded or not)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def saved_models_and_grams(root, arch: str = "llama", k: int = 3, seed: int = 0, prefix: str = "m"):
    """k tiny models of `arch` saved under root/{prefix}{i} and their Gram files under root; returns
    (models, model paths, Gram file paths)."""
    _, models = make_models(arch, k=k, seed=seed)
    mods, acts = make_activations(models[0], k, seed=seed)
    paths = [save_model(m, root / f"{prefix}{i}") for i, m in enumerate(models)]
    return models, paths, write_gram_files(models[0], mods, acts, root)


def assert_one_line_error(rc, err, *needles):
    """A user mistake: exit 2 and one line `regmean_fast: error: ...` holding every needle."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regmean_fast: error: "), err
    for s in needles:
        assert s in lines[0], lines[0]
