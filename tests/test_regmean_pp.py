"""merge --method regmean++: against an independent fp64 loop written here (plain transformers modules, Grams
captured with forward hooks through the already merged prefix, a plain RegMean solve per Linear)."""

import copy
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

from regmean_fast.cli import main  # noqa: E402

ALPHA = 0.9


def _data(folder, n, seed):
    path = os.path.join(folder, f"data{seed}.txt")
    with open(path, "w") as f:
        f.write("\n".join(hf_tiny.random_texts(n, seed=seed)) + "\n")
    return path


def _save_models(root, k, kind, seed=0, **overrides):
    """k tiny random models root/m0 .. m{k-1}, seeds seed .. seed + k - 1 -> their folders."""
    folders = [str(root / f"m{i}") for i in range(k)]
    for i, f in enumerate(folders):
        _save(f, kind, seed=seed + i, **overrides)
    return folders


def _save(folder, kind, seed, embed_from=None, **overrides):
    """A tiny random model; embed_from: another model whose input embeddings it takes (so the data enters
    every model's first block the same way)."""
    if kind == "roberta-cls":  # not among hf_tiny's kinds: its word-level tokenizer, padding id 0
        import transformers as T

        cfg = T.RobertaConfig(vocab_size=hf_tiny.VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=80, pad_token_id=0, num_labels=3)
        cfg.architectures = ["RobertaForSequenceClassification"]
        torch.manual_seed(seed)
        model, tok = T.RobertaForSequenceClassification(cfg).eval(), hf_tiny.make_tokenizer("bert")
        with torch.no_grad():  # non-trivial biases and norms, as hf_tiny makes them
            for n, p in model.named_parameters():
                if n.endswith("bias") or "LayerNorm" in n:
                    p.add_(0.1 * torch.randn_like(p))
    else:
        model, tok = hf_tiny.make_model(kind, seed, **overrides)
    if embed_from is not None:
        model.get_input_embeddings().weight.data.copy_(embed_from.get_input_embeddings().weight)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return model


def _merge(capsys, *args):
    rc = main(["merge", *map(str, args)])
    err = capsys.readouterr().err
    return rc, err


def _load(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


# ---- the independent fp64 loop ---------------------------------------------------------------------------
def _examples(folder, path, max_length=64):
    """Each example alone (no padding to exclude), tokenized as the grams command does (docs: a JSONL line's
    chat `messages` rendered with the tokenizer's chat template, then tokenized without special tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if path.endswith(".jsonl"):
        chats = [json.loads(line)["messages"] for line in open(path) if line.strip()]
        return [torch.tensor([tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False,
                                  truncation=True, max_length=max_length)["input_ids"]]) for c in chats]
    texts = [t for t in open(path).read().splitlines() if t.strip()]
    return [torch.tensor([tok(t, truncation=True, max_length=max_length)["input_ids"]]) for t in texts]


def _regmean_solve(Ws, Gs, ns, alpha, conv1d=False, coeffs=None):
    """W* = (sum_i G~_i)^-1 sum_i G~_i W_i^T, G~_i = c_i (alpha N_i + (1 - alpha) diag N_i), N_i = G_i / n_i,
    c_i = 1 / K unless given (a Conv1D stores W^T)."""
    A = B = 0
    coeffs = coeffs or [1 / len(Ws)] * len(Ws)
    for W, G, n, c in zip(Ws, Gs, ns, coeffs):
        N = G / n
        Gt = c * (alpha * N + (1 - alpha) * torch.diag(torch.diagonal(N)))
        A = A + Gt
        B = B + Gt @ (W if conv1d else W.T)
    X = torch.linalg.solve(A, B)
    return X if conv1d else X.T


def _is_linear(m):
    return isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"


def _blocks(model):
    """(the blocks' name prefix, the ModuleList), looked up by hand for the architectures tested here."""
    for path in ("model.layers", "transformer.h", "bert.encoder.layer", "roberta.encoder.layer", "encoder.layer"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return path + ".", obj
    raise AssertionError("no blocks")


def _set(model, path, module):
    parent, _, leaf = path.rpartition(".")
    obj = model
    for part in parent.split(".") if parent else []:
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.ModuleList):
        obj[int(leaf)] = module
    else:
        setattr(obj, leaf, module)


def _grams_of(model, modules, inputs):
    """{module name: (sum x^T x, rows)} of the inputs the named Linear modules see."""
    acc = {n: [0, 0] for n in modules}
    hooks = []
    for n, m in model.named_modules():
        if n in acc:
            def hook(mod, args, n=n):
                x = args[0].reshape(-1, args[0].shape[-1])
                acc[n][0] = acc[n][0] + x.T @ x
                acc[n][1] += x.shape[0]
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in inputs:
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    return acc


def _load_fp64(folder):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(folder)
    return getattr(transformers, cfg.architectures[0]).from_pretrained(folder, dtype=torch.float64).eval()


def regmean_pp_oracle(folders, data_files, alpha=ALPHA, weights=None, out_dtype=None):
    """Merged state dict: what is outside the blocks and the heads averaged; block l merged with Grams of each
    model's data through the merged blocks 0..l-1 and its own block l; the heads (Linear modules outside the
    blocks, not tied) with Grams of each model's data through the merged model up to its own heads."""
    models = [_load_fp64(f) for f in folders]
    data = [_examples(f, d) for f, d in zip(folders, data_files)]
    merged = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    prefix, blocks = _blocks(merged)
    emb = merged.get_input_embeddings().weight
    heads = [n for n, m in merged.named_modules() if _is_linear(m) and not n.startswith(prefix)
             and m.weight is not emb]
    conv1d = {n for n, m in merged.named_modules() if type(m).__name__ == "Conv1D"}
    coeffs = [w / sum(weights) for w in weights] if weights else [1 / len(models)] * len(models)

    def merge_params(names, grams):
        sd = merged.state_dict()
        for n in names:
            mod = n[: -len(".weight")]
            if n.endswith(".weight") and mod in grams[0]:
                sd[n] = _regmean_solve([s[n] for s in sds], [g[mod][0] for g in grams], [g[mod][1] for g in grams],
                                       alpha, mod in conv1d, coeffs)
            else:
                sd[n] = sum(c * s[n] for c, s in zip(coeffs, sds))
            if out_dtype is not None:  # what the output holds, and so what the next parts read through
                sd[n] = sd[n].to(out_dtype).to(torch.float64)
        merged.load_state_dict(sd)

    in_heads = lambda n: any(n.startswith(h + ".") for h in heads)  # noqa: E731
    merge_params([n for n in sds[0] if not n.startswith(prefix) and not in_heads(n)], [{}])
    for li in range(len(blocks)):
        pre = f"{prefix}{li}."
        linears = [pre + n for n, m in blocks[li].named_modules() if _is_linear(m)]
        grams = []
        for i, m in enumerate(models):
            hybrid = copy.deepcopy(merged)
            _set(hybrid, f"{prefix}{li}", _blocks(m)[1][li])  # the merged prefix, then model i's own block
            grams.append(_grams_of(hybrid, linears, data[i]))
        merge_params([n for n in sds[0] if n.startswith(pre)], grams)
    if heads:
        grams = []
        for i, m in enumerate(models):
            hybrid = copy.deepcopy(merged)  # the merged model, model i's own heads
            for h in heads:
                _set(hybrid, h, dict(m.named_modules())[h])
            grams.append(_grams_of(hybrid, heads, data[i]))
        merge_params([n for n in sds[0] if in_heads(n)], grams)
    return {k: v for k, v in merged.state_dict().items()}


def _plain_regmean_oracle_block(folders, data_files, li, alpha=ALPHA):
    """Block li's q_proj merged by plain RegMean (each model's own prefix): what RegMean++ must differ from."""
    models = [_load_fp64(f) for f in folders]
    mod = f"model.layers.{li}.self_attn.q_proj"
    grams = [_grams_of(m, [mod], _examples(f, d))[mod] for m, f, d in zip(models, folders, data_files)]
    return _regmean_solve([m.state_dict()[mod + ".weight"] for m in models], [g[0] for g in grams],
                          [g[1] for g in grams], alpha)


def _rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


# ---- tests -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,groups", [("llama", 9), ("qwen2", 9), ("gemma3", 12), ("bert-cls", 10),
                                         ("roberta-cls", 10), ("gpt2-cls", 9), ("gpt2", 8)])
def test_equals_independent_fp64_loop(kind, groups, tmp_path, capsys):
    """Gemma-3: scaled embeddings, q/k norms, sliding-window layers, a head tied to the embeddings (no Grams).
    BERT, RoBERTa and GPT-2 through the generic path: a pooler and a classifier, RoBERTa's head on the first
    token, a score head on every token, Conv1D weights, a tied LM head."""
    folders = _save_models(tmp_path, 3, kind)
    data = [_data(str(tmp_path), 5 + i, seed=20 + i) for i in range(3)]
    out = tmp_path / "out"
    rc, err = _merge(capsys, "--method", "regmean++", "--models", *folders, "--data", *data, "--out", out,
                     "--batch-size", "3")
    assert rc == 0, err
    got = _load(out)
    want = regmean_pp_oracle(folders, data)
    assert set(got) <= set(want) and set(want) - set(got) <= {"lm_head.weight"}  # tied: not stored
    for n in got:
        assert _rel_err(got[n], want[n]) < 3e-5, (n, _rel_err(got[n], want[n]))
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "regmean++" and report["groups"] == groups
    if kind in ("llama", "qwen2", "gemma3"):
        assert report["tensors"]["model.layers.1.mlp.up_proj.weight"]["method"] == "regmean"
        # the test can tell: block 1 merged with plain RegMean's Grams is far from RegMean++'s
        plain = _plain_regmean_oracle_block(folders, data, 1)
        assert _rel_err(plain, want["model.layers.1.self_attn.q_proj.weight"]) > 1e-2


def test_weights_and_alpha(tmp_path, capsys):
    """Unequal model weights (c_i in the solve and in the averages) and another alpha, as RegMean takes them."""
    folders = _save_models(tmp_path, 3, "llama", seed=10)
    data = [_data(str(tmp_path), 4, seed=70 + i) for i in range(3)]
    rc, err = _merge(capsys, "--method", "regmean++", "--models", *folders, "--data", *data, "--out", tmp_path / "o",
                     "--weights", "1", "2", "5", "--alpha", "0.5")
    assert rc == 0, err
    got, want = _load(tmp_path / "o"), regmean_pp_oracle(folders, data, alpha=0.5, weights=[1, 2, 5])
    equal = regmean_pp_oracle(folders, data, alpha=0.5)
    for n in got:
        assert _rel_err(got[n], want[n]) < 3e-5, (n, _rel_err(got[n], want[n]))
    assert _rel_err(equal["model.layers.1.mlp.down_proj.weight"], want["model.layers.1.mlp.down_proj.weight"]) > 1e-2


def test_out_dtype_is_what_the_next_blocks_read(tmp_path, capsys):
    """--out-dtype bfloat16: each merged block is written in bf16, and the data goes on through those weights."""
    folders = _save_models(tmp_path, 2, "llama", seed=20)
    data = [_data(str(tmp_path), 4, seed=80 + i) for i in range(2)]
    rc, err = _merge(capsys, "--method", "regmean++", "--models", *folders, "--data", *data, "--out", tmp_path / "o",
                     "--out-dtype", "bfloat16")
    assert rc == 0, err
    got = _load(tmp_path / "o")
    want = regmean_pp_oracle(folders, data, out_dtype=torch.bfloat16)
    for n in got:
        assert got[n].dtype == torch.bfloat16
        # the same bf16 values but where fp32 and fp64 round to neighbours (~1% of them; had the data gone on
        # through unrounded merged blocks, ~40-50% of the later blocks' values would differ)
        differ = float((got[n] != want[n].to(torch.bfloat16)).double().mean())
        assert differ < 0.05 and _rel_err(got[n], want[n]) < 2 ** -7, (n, differ)


def test_chat_messages(tmp_path, capsys):
    """JSON Lines of chat `messages` (no text field): rendered with each model's chat template, as by grams."""
    folders = _save_models(tmp_path, 2, "llama", seed=30)
    data = []
    for i in range(2):
        texts = hf_tiny.random_texts(6, seed=100 + i)
        path = tmp_path / f"chat{i}.jsonl"
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": a},
                                                         {"role": "assistant", "content": b}]}) + "\n"
                                for a, b in zip(texts[::2], texts[1::2])))
        data.append(str(path))
    rc, err = _merge(capsys, "--method", "regmean++", "--models", *folders, "--data", *data, "--out", tmp_path / "o")
    assert rc == 0, err
    got, want = _load(tmp_path / "o"), regmean_pp_oracle(folders, data)
    for n in got:
        assert _rel_err(got[n], want[n]) < 3e-5, (n, _rel_err(got[n], want[n]))


def test_one_model_gives_it_back(tmp_path, capsys):
    f = str(tmp_path / "m")
    _save(f, "llama", seed=3)
    d = _data(str(tmp_path), 4, seed=1)
    rc, err = _merge(capsys, "--method", "regmean++", "--models", f, "--data", d, "--out", tmp_path / "out")
    assert rc == 0, err
    got, want = _load(tmp_path / "out"), _load(f)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7)


def test_one_block_equals_regmean(tmp_path, capsys):
    """With one decoder block and the same input embeddings, block 0 sees each model's own data as in RegMean.
    The LM head would differ by design (RegMean++ reads the merged block's output): averaged in both."""
    folders = [str(tmp_path / f"m{i}") for i in range(3)]
    first = None
    for i, f in enumerate(folders):
        m = _save(f, "llama", seed=i, embed_from=first, num_hidden_layers=1)
        first = first or m
    data = [_data(str(tmp_path), 6, seed=30 + i) for i in range(3)]
    grams = []
    for i, (f, d) in enumerate(zip(folders, data)):
        g = str(tmp_path / f"g{i}.safetensors")
        rc = main(["grams", f, "--data", d, "--out", g, "--batch-size", "4", "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        grams.append(g)
    common = ["--models", *folders, "--regmean-exclude", "lm_head"]
    rc, err = _merge(capsys, *common, "--grams", *grams, "--out", tmp_path / "rm")
    assert rc == 0, err
    rc, err = _merge(capsys, *common, "--method", "regmean++", "--data", *data, "--out", tmp_path / "pp",
                     "--batch-size", "4")
    assert rc == 0, err
    rm, pp = _load(tmp_path / "rm"), _load(tmp_path / "pp")
    assert set(rm) == set(pp)
    for n in rm:
        torch.testing.assert_close(pp[n], rm[n], rtol=1e-5, atol=1e-6)


def test_yaml_equals_flags(tmp_path, capsys):
    folders = _save_models(tmp_path, 2, "llama")
    data = [_data(str(tmp_path), 5, seed=40 + i) for i in range(2)]
    rc, err = _merge(capsys, "--method", "regmean++", "--models", *folders, "--data", *data, "--out",
                     tmp_path / "a", "--alpha", "0.5", "--max-examples", "3", "--max-length", "6")
    assert rc == 0, err
    (tmp_path / "c.yaml").write_text(
        "method: regmean++\nmodels:\n" + "".join(f"  - model: {f}\n    data: {d}\n" for f, d in zip(folders, data))
        + "parameters: {alpha: 0.5}\ncalibration: {max_examples: 3, max_length: 6}\n")
    rc, err = _merge(capsys, tmp_path / "c.yaml", "--out", tmp_path / "b")
    assert rc == 0, err
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    # the saved configuration reproduces it
    rc, err = _merge(capsys, tmp_path / "a" / "regmean_config.yml", "--out", tmp_path / "c")
    assert rc == 0, err
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def two_llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp_err")
    folders = [str(root / f"m{i}") for i in range(2)]
    for i, f in enumerate(folders):
        _save(f, "llama", seed=i)
    data = [_data(str(root), 3, seed=50 + i) for i in range(2)]
    other = [str(root / f"c{i}") for i in range(2)]  # a decoder with a classifier head: not run block by block
    for i, f in enumerate(other):
        _save(f, "llama-cls", seed=i)
    return root, folders, data, other


@pytest.mark.parametrize("case,extra,expect", [
    ("no data", [], "needs one calibration data file per model"),
    ("data count", ["--data", "D0"], "got 1 data files for 2 models"),
    ("device", ["--data", "D0", "D1", "--device", "tpu"], "device must be cpu, cuda or cuda:N"),
    ("architecture", ["--data", "D0", "D1", "OTHER"], "architecture LlamaForSequenceClassification"),
    ("data for regmean", ["--method", "regmean", "--data", "D0", "D1"], "only read by regmean++"),
    ("missing file", ["--data", "D0", "nope.jsonl"], "does not exist"),
    ("batch size", ["--data", "D0", "D1", "--batch-size", "0"], "batch_size must be an integer >= 1"),
    ("empty data", ["--data", "D0", "EMPTY"], "has no examples"),
])
def test_cli_errors_are_one_line(case, extra, expect, two_llamas, capsys):
    root, folders, data, other = two_llamas
    (root / "empty.txt").write_text("\n")
    models = other if "OTHER" in extra else folders
    extra = [{"D0": data[0], "D1": data[1], "EMPTY": str(root / "empty.txt")}.get(a, a) for a in extra if a != "OTHER"]
    args = ["--models", *models, "--out", root / f"out-{case}", *extra]
    if "--method" not in extra:
        args = ["--method", "regmean++", *args]
    rc, err = _merge(capsys, *args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("regmean_fast: error: ") and expect in lines[0], err
    assert not (root / f"out-{case}").exists()
    assert not any(p.name.endswith(".regmean-partial") for p in root.iterdir())


def test_interrupt_then_resume_is_bit_identical(two_llamas, tmp_path):
    """Ctrl-C after two shards keeps them; --resume recomputes the blocks (their merged weights carry the hidden
    states), reuses the verified shards and ends byte-identical to an uninterrupted merge."""
    from regmean_fast.merge import merge

    _, folders, data, _ = two_llamas
    cfg = {"method": "regmean++", "models": [{"model": f, "data": d} for f, d in zip(folders, data)],
           "shard_size": "8KB"}
    merge(cfg, out=str(tmp_path / "ref"))
    done = []

    def stop_after_two(fname):
        done.append(fname)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(cfg, out=str(tmp_path / "out"), on_shard_done=stop_after_two)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.regmean-partial").is_dir()
    rep = merge(cfg, out=str(tmp_path / "out"), resume=True)
    assert sorted(rep["reused_shards"]) == sorted(done)
    shards = sorted(p.name for p in (tmp_path / "ref").iterdir() if p.name.endswith(".safetensors"))
    assert len(shards) > 3
    for name in shards + ["model.safetensors.index.json"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_merge_modules_equals_the_loop_and_the_cli(tmp_path, capsys):
    """In-memory models and padded batches (the FusionBench way) give the fp64 loop's result, and the CLI's."""
    import regmean_fast as rf

    folders = [str(tmp_path / f"m{i}") for i in range(3)]
    models = [_save(f, "llama", seed=i) for i, f in enumerate(folders)]
    data = [_data(str(tmp_path), 5 + i, seed=60 + i) for i in range(3)]
    tok = hf_tiny.make_tokenizer("llama")
    batches = [hf_tiny.batches_of(tok, open(d).read().split("\n")[:-1], batch_size=2) for d in data]
    assert any(int(b["attention_mask"].min()) == 0 for bs in batches for b in bs)  # padding to exclude
    merged = rf.merge_modules(models, data=batches, method="regmean++")
    got = merged.state_dict()
    want = regmean_pp_oracle(folders, data)
    for n in want:
        assert _rel_err(got[n], want[n]) < 3e-5, (n, _rel_err(got[n], want[n]))
    rc, err = _merge(capsys, "--method", "regmean++", "--models", *folders, "--data", *data, "--out", tmp_path / "o")
    assert rc == 0, err
    cli = _load(tmp_path / "o")
    for n in cli:
        assert _rel_err(got[n], cli[n]) < 1e-5, n
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(),
                                                 hf_tiny.make_model("llama", 0)[0].state_dict().values()))
    from regmean_fast.merge import MergeError

    with pytest.raises(MergeError, match="one data set per model"):
        rf.merge_modules(models, data=batches[:2], method="regmean++")


def test_checkpoint_every_block_then_resume(tmp_path, capsys, monkeypatch):
    """--checkpoint-every 1, stopped after two of four blocks (Stop's test hook: Ctrl-C): --resume goes on from
    the checkpoint (the first blocks are not merged again) and ends byte-identical, report included."""
    folders = _save_models(tmp_path, 2, "llama", num_hidden_layers=4)
    data = [_data(str(tmp_path), 5, seed=90 + i) for i in range(2)]
    args = ["--method", "regmean++", "--models", *folders, "--data", *data, "--shard-size", "10KB"]
    rc, err = _merge(capsys, *args, "--out", tmp_path / "ref")
    assert rc == 0, err
    monkeypatch.setenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER", "2")
    rc, err = _merge(capsys, *args, "--out", tmp_path / "out", "--checkpoint-every", "1")
    assert rc == 130 and "after decoder block 2 of 4" in err, err
    partial = tmp_path / ".out.regmean-partial"
    assert (partial / "regmean-pp-checkpoint.safetensors").exists() and not (tmp_path / "out").exists()
    monkeypatch.delenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER")
    rc, err = _merge(capsys, *args, "--out", tmp_path / "out", "--checkpoint-every", "1", "--resume")
    assert rc == 0 and "resuming from the checkpoint at decoder block 3 of 4" in err, err
    ref = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ref and len(
        [n for n in ref if n.endswith(".safetensors")]) > 3
    for name in ref:
        if name.endswith(".safetensors") or name.endswith(".json") and name != "merge_report.json":
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    a, b = (json.loads((tmp_path / d / "merge_report.json").read_text()) for d in ("ref", "out"))
    assert a["groups"] == b["groups"] and a["warnings"] == b["warnings"]
    assert {n: e["method"] for n, e in a["tensors"].items()} == {n: e["method"] for n, e in b["tensors"].items()}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_holds_one_block_at_a_time(tmp_path, capsys):
    """--device cuda: the CPU run's result (fp32 on another device; the fp64 loop's for 2 blocks), and the peak
    device memory does not grow with the number of blocks (2 against 8): only the current block (each model's
    own, then the merged one) is on the device, never the models."""
    peaks, block_bytes = {}, None
    for layers in (2, 8):
        root = tmp_path / f"L{layers}"
        folders = [str(root / f"m{i}") for i in range(2)]
        for i, f in enumerate(folders):
            _save(f, "llama", seed=i, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers)
        data = [_data(str(root), 6, seed=40 + i) for i in range(2)]
        args = ["--method", "regmean++", "--models", *folders, "--data", *data, "--batch-size", "3"]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        rc, err = _merge(capsys, *args, "--out", root / "gpu", "--device", "cuda")
        assert rc == 0, err
        torch.cuda.synchronize()
        peaks[layers] = torch.cuda.max_memory_allocated() - before
        rc, err = _merge(capsys, *args, "--out", root / "cpu")
        assert rc == 0, err
        gpu, cpu = _load(root / "gpu"), _load(root / "cpu")
        assert set(gpu) == set(cpu)
        for n in cpu:
            assert _rel_err(gpu[n], cpu[n]) < 1e-4, (n, _rel_err(gpu[n], cpu[n]))
        if layers == 2:
            want = regmean_pp_oracle(folders, data)
            for n in gpu:
                assert _rel_err(gpu[n], want[n]) < 1e-4, (n, _rel_err(gpu[n], want[n]))
        block_bytes = sum(4 * t.numel() for n, t in cpu.items() if n.startswith("model.layers.0."))
    # the 6 more blocks of 2 models resident would add 12 blocks; one block at a time adds nothing
    assert peaks[8] - peaks[2] < block_bytes, (peaks, block_bytes)
