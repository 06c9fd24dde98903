import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

from regmean_fast import load_grams  # noqa: E402
from regmean_fast.cli import main  # noqa: E402
from regmean_fast.grams import collect_grams  # noqa: E402
from regmean_fast.grams.checkpoint import checkpoint_path  # noqa: E402


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    models = {k: hf_tiny.save_tiny(root / k, k) for k in ("bert-cls", "gpt2", "llama", "qwen2", "gemma3")}
    texts = hf_tiny.random_texts(11, seed=1)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(texts)))
    return root, models, texts, str(data)


def _run(capsys, *argv):
    rc = main(["grams", *map(str, argv), "--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.err


def test_cli_matches_api_bert(zoo, tmp_path, capsys):
    root, models, texts, data = zoo
    out = tmp_path / "bert.safetensors"
    rc, err = _run(capsys, models["bert-cls"], "--data", data, "--out", out, "--batch-size", 4)
    assert rc == 0, err
    gs = load_grams(out, verify=True)
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(models["bert-cls"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(models["bert-cls"])
    ref = collect_grams(model, hf_tiny.batches_of(tok, texts, 4, max_length=64))
    assert gs.modules() == ref.modules()
    for m in gs.modules():
        assert gs.gram_key(m) == ref.gram_key(m) and gs.count(m) == ref.count(m)
        assert torch.allclose(gs.gram(m), ref.gram(m), rtol=1e-5, atol=1e-5)
    assert gs.metadata["examples"] == 11 and gs.metadata["max_length"] == 64
    assert gs.fingerprint["architectures"] == ["BertForSequenceClassification"]
    # every module's weight is in the checkpoint under f"{module}.weight", with the recorded shape
    from safetensors import safe_open

    with safe_open(os.path.join(models["bert-cls"], "model.safetensors"), "pt") as f:
        for m, shape in gs.fingerprint["weights"].items():
            assert list(f.get_slice(m + ".weight").get_shape()) == shape


def _oracle(model_dir, texts, pad_batch=None):
    """fp64 sums of every Linear / Conv1D input (tied lm_head aside), independent of regmean_fast: one unpadded
    example at a time (padding excluded), or right-padded batches of pad_batch keeping every row."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    model = getattr(transformers, cfg.architectures[0]).from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    params = {n for n, _ in model.named_parameters()}
    sums, counts = {}, {}

    def hook(name):
        def f(mod, args):
            x = args[0].detach().double().reshape(-1, args[0].size(-1))
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.size(0)
        return f

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
          if isinstance(m, (torch.nn.Linear, Conv1D)) and f"{n}.weight" in params]
    groups = [[t] for t in texts] if pad_batch is None else [texts[i:i + pad_batch]
                                                             for i in range(0, len(texts), pad_batch)]
    with torch.no_grad():
        for g in groups:
            model(**tok(g, padding=True, return_tensors="pt"))
    for h in hs:
        h.remove()
    return sums, counts


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("kind", ["bert-cls", "gpt2", "llama", "qwen2", "gemma3"])
def test_cli_grams_equal_fp64_oracle(zoo, tmp_path, capsys, kind, padding):
    """Through the command: every Gram and count equals fp64 sums of the module's inputs without the padding
    rows (each example run alone, unpadded) or with them (--include-padding: the same padded batches)."""
    root, models, texts, data = zoo
    out = tmp_path / "g.safetensors"
    rc, err = _run(capsys, models[kind], "--data", data, "--out", out, "--batch-size", 4,
                   *(["--include-padding"] if padding else []))
    assert rc == 0, err
    gs = load_grams(out, verify=True)
    ref, cnt = _oracle(models[kind], texts, 4 if padding else None)
    assert set(gs.modules()) == set(ref)
    for m in gs.modules():
        assert gs.count(m) == cnt[m], m
        err = (gs.gram(m).double() - ref[m]).abs().max() / ref[m].abs().max()
        assert err < 1e-5, (m, float(err))
    import transformers

    lengths = [len(t) for t in transformers.AutoTokenizer.from_pretrained(models[kind])(texts)["input_ids"]]
    pads = sum(max(lengths[i:i + 4]) * len(lengths[i:i + 4]) for i in range(0, len(lengths), 4))
    assert gs.metadata["tokens"] == (pads if padding else sum(lengths))


def test_cli_formats_and_sharding(zoo, tmp_path, capsys):
    root, models, texts, data = zoo
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(texts) + "\n\n")
    csvf = tmp_path / "d.csv"
    csvf.write_text("id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts)))
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c"
    assert _run(capsys, models["gpt2"], "--data", data, "--out", a)[0] == 0
    assert _run(capsys, models["gpt2"], "--data", txt, "--out", b)[0] == 0
    rc, err = _run(capsys, models["gpt2"], "--data", csvf, "--text-field", "body", "--out", c, "--packed",
                   "--shard-size", "20KB")
    assert rc == 0, err
    ga, gb, gc = load_grams(a), load_grams(b), load_grams(c, verify=True)
    assert len([f for f in os.listdir(c) if f.endswith(".safetensors")]) > 1
    for m in ga.modules():
        assert torch.equal(ga.gram(m), gb.gram(m)) and torch.allclose(ga.gram(m), gc.gram(m))
    assert ga.is_conv1d("transformer.h.0.attn.c_attn") and gc.layout == "packed"


def test_cli_chat_messages(zoo, tmp_path, capsys):
    root, models, texts, data = zoo
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t},
                                                     {"role": "assistant", "content": "w1 w2"}]}) + "\n"
                            for t in texts[:5]))
    out = tmp_path / "chat.safetensors"
    rc, err = _run(capsys, models["llama"], "--data", chat, "--out", out, "--max-tokens", 40)
    assert rc == 0, err
    gs = load_grams(out)
    assert gs.metadata["tokens"] == 40 and gs.count("model.layers.0.self_attn.q_proj") == 40


def test_cli_refuses_overwrite_then_force(zoo, tmp_path, capsys):
    root, models, texts, data = zoo
    out = tmp_path / "g"
    assert _run(capsys, models["llama"], "--data", data, "--out", out, "--max-examples", 3)[0] == 0
    before = os.listdir(out)
    rc, err = _run(capsys, models["llama"], "--data", data, "--out", out)
    assert rc == 2 and "already exists" in err and "--force" in err
    assert os.listdir(out) == before
    assert _run(capsys, models["llama"], "--data", data, "--out", out, "--force")[0] == 0
    assert load_grams(out).metadata["examples"] == 11


def _bad_inputs(root, models, data, tmp):
    tmp.mkdir(exist_ok=True)
    nost = tmp / "nost"
    nost.mkdir(exist_ok=True)
    (nost / "config.json").write_text(open(os.path.join(models["llama"], "config.json")).read())
    (nost / "pytorch_model.bin").write_bytes(b"x")
    empty = tmp / "empty.jsonl"
    empty.write_text("\n\n")
    malformed = tmp / "bad.jsonl"
    malformed.write_text('{"text": "w1 w2"}\n{"text": "w3"\n')
    nofield = tmp / "nofield.jsonl"
    nofield.write_text('{"text": "w1"}\n{"body": "w3"}\n')
    blank = tmp / "blank.jsonl"
    blank.write_text('{"text": "w1"}\n{"text": "w2"}\n{"text": "   "}\n')
    exists = tmp / "exists.safetensors"
    exists.write_bytes(b"old")
    out = tmp / "new.safetensors"
    L = models["llama"]
    return [
        ([tmp / "nope", "--data", data, "--out", out], "model folder not found"),
        ([nost, "--data", data, "--out", out], "not a readable PyTorch checkpoint"),
        ([L, "--data", tmp / "missing.jsonl", "--out", out], "data file not found"),
        ([L, "--data", empty, "--out", out], "no examples"),
        ([L, "--data", malformed, "--out", out], "line 2: malformed JSON"),
        ([L, "--data", nofield, "--out", out], "line 2: no 'text' field"),
        ([L, "--data", blank, "--out", out], "line 3: the example tokenizes to nothing"),
        ([L, "--data", data, "--out", out, "--max-length", 65], "beyond the model's limit of 64"),
        ([L, "--data", data, "--out", out, "--include", "zzz"],
         "no nn.Linear / Conv1D modules matched (--include 'zzz')"),
        ([L, "--data", data, "--out", out, "--exclude", "("],
         "exclude pattern '(' is not a regular expression (missing ), unterminated subpattern at position 0)"),
        ([L, "--data", data, "--out", out, "--include", "q_", "--exclude", "proj"],
         "no nn.Linear / Conv1D modules matched (--include 'q_' --exclude 'proj')"),
        ([L, "--data", data, "--out", exists], "output already exists"),
        ([L, "--data", data, "--out", tmp / "nodir" / "g.safetensors"], "output folder does not exist"),
        ([L, "--data", data, "--out", out, "--device", "cuda:99"], "--device cuda:99"),
    ]


def test_cli_example_of_special_tokens_only(zoo, tmp_path, capsys):
    """Text the tokenizer's normaliser removes entirely (an accent alone, accents stripped) leaves only the
    [CLS] [SEP] it adds: that example tokenizes to nothing. A --max-length with no room for text is refused."""
    from tokenizers import normalizers

    root, models, texts, data = zoo
    m = tmp_path / "bert"
    hf_tiny.save_tiny(m, "bert-cls")
    tok = hf_tiny.make_tokenizer("bert")
    tok._tokenizer.normalizer = normalizers.BertNormalizer(strip_accents=True, lowercase=False)
    tok.save_pretrained(m)
    capsys.readouterr()  # the saving's progress bars
    assert tok("\u0301")["input_ids"] == [tok.cls_token_id, tok.sep_token_id]  # what the data below gives
    bad = tmp_path / "accent.jsonl"
    bad.write_text(json.dumps({"text": "w1 w2"}) + "\n" + json.dumps({"text": "\u0301"}) + "\n")
    out = tmp_path / "g.safetensors"
    rc, err = _run(capsys, m, "--data", bad, "--out", out)
    assert rc == 2 and err.strip() == f"regmean_fast: error: {bad}: line 2: the example tokenizes to nothing", err
    rc, err = _run(capsys, m, "--data", data, "--out", out, "--max-length", 2)
    assert rc == 2 and "--max-length 2 leaves no room for text next to the tokenizer's 2 special tokens" in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(out)


def test_cli_bad_inputs(zoo, tmp_path, capsys):
    root, models, texts, data = zoo
    for argv, want in _bad_inputs(root, models, data, tmp_path):
        if "cuda" in str(argv[-1]) and torch.cuda.is_available():
            continue
        rc, err = _run(capsys, *argv)
        assert rc == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("regmean_fast: error: "), err
        assert want in lines[0], (want, lines[0])
        assert not os.path.exists(tmp_path / "new.safetensors")
        assert (tmp_path / "exists.safetensors").read_bytes() == b"old"
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f or "checkpoint" in f]


def test_cli_nonfinite_names_module(tmp_path, capsys, zoo):
    root, models, texts, data = zoo
    model, tok = hf_tiny.make_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:] = float("nan")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rc, err = _run(capsys, tmp_path / "m", "--data", data, "--out", tmp_path / "g.safetensors")
    assert rc == 2 and "non-finite" in err and "model.layers.1.post_attention_layernorm" not in err
    assert "model.layers.1.mlp.gate_proj" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "g.safetensors")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_cli_unwritable(zoo, tmp_path, capsys):
    root, models, texts, data = zoo
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    rc, err = _run(capsys, models["llama"], "--data", data, "--out", ro / "g.safetensors")
    assert rc == 2 and "not writable" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_cli_unwritable_even_for_root(zoo, capsys):
    """Permission bits do not tell (root, read-only mounts): /proc refuses new files to everyone. Refused up
    front with one line, not with a traceback after the whole run."""
    root, models, texts, data = zoo
    for out in ("/proc/regmean_fast_test.safetensors", "/proc/regmean_fast_test"):
        rc, err = _run(capsys, models["llama"], "--data", data, "--out", out)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "regmean_fast: error: output folder is not writable: /proc" in err, err


def test_resume_identical(zoo, tmp_path, capsys, monkeypatch):
    root, models, texts, data = zoo
    common = ["--data", data, "--batch-size", 2, "--shuffle", "--seed", 3]
    full = tmp_path / "full.safetensors"
    assert _run(capsys, models["bert-cls"], *common, "--out", full)[0] == 0
    part = tmp_path / "part.safetensors"
    monkeypatch.setenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER", "2")
    rc, err = _run(capsys, models["bert-cls"], *common, "--out", part, "--checkpoint-every", 1)
    assert rc == 130 and "--resume" in err and os.path.exists(checkpoint_path(str(part)))
    assert not os.path.exists(part)
    rc, err = _run(capsys, models["bert-cls"], *common, "--out", part, "--resume")  # stops again after 2 more
    assert rc == 130
    rc, err = _run(capsys, models["bert-cls"], *common, "--out", part, "--resume", "--max-examples", 5)
    assert rc == 2 and "another model, data or settings" in err
    monkeypatch.delenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER")
    rc, err = _run(capsys, models["bert-cls"], *common, "--out", part, "--resume")
    assert rc == 0, err
    assert open(full, "rb").read() == open(part, "rb").read()
    assert not os.path.exists(checkpoint_path(str(part)))
    # nothing to resume from: a fresh start, with a note; then the same command finds it complete
    x = tmp_path / "x.safetensors"
    rc, err = _run(capsys, models["bert-cls"], *common, "--out", x, "--resume")
    assert rc == 0 and "regmean_fast: note: --resume: nothing to resume from" in err, err
    assert x.read_bytes() == full.read_bytes()
    stamp = os.stat(x).st_mtime_ns
    rc, err = _run(capsys, models["bert-cls"], *common, "--out", x, "--resume")
    assert rc == 0 and err.strip() == f"regmean_fast: note: --resume: {x} is complete and was made by this " \
        "command; nothing to do", err
    assert os.stat(x).st_mtime_ns == stamp
    # complete but made otherwise (other settings, another tool's file): one line, untouched
    rc, err = _run(capsys, models["bert-cls"], *common, "--out", x, "--resume", "--max-examples", 5)
    assert rc == 2 and "exists but was made with another model, data or settings" in err, err
    assert len(err.strip().splitlines()) == 1 and os.stat(x).st_mtime_ns == stamp
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a Gram file")
    rc, err = _run(capsys, models["bert-cls"], *common, "--out", junk, "--resume")
    assert rc == 2 and "exists but is not a readable Gram file" in err and junk.read_bytes() == b"not a Gram file"
    rc, err = _run(capsys, models["bert-cls"], *common, "--out", junk, "--resume", "--force")  # replaced
    assert rc == 0 and junk.read_bytes() == full.read_bytes(), err


def test_make_batches_longest_first():
    from regmean_fast.grams.data import make_batches

    g = torch.Generator().manual_seed(5)
    lengths = [int(v) for v in torch.randint(1, 40, (23,), generator=g)]
    ids = [[100 + i] * n for i, n in enumerate(lengths)]  # each example recognisable by its first id
    labels = list(range(23))
    for max_tokens in (None, 300):
        plain = make_batches(ids, 4, 0, max_tokens, labels)
        longest = make_batches(ids, 4, 0, max_tokens, labels, longest_first=True)

        def rows(batches):
            return sorted((int(b.input_ids[r, 0]), int(b.attention_mask[r].sum()), int(b.labels[r]))
                          for b in batches for r in range(b.input_ids.size(0)))

        # the same examples (same cut at max_tokens, in data order), each with its own label
        assert rows(longest) == rows(plain)
        assert all(first - 100 == lab for first, _, lab in rows(longest))
        real = [r[1] for r in rows(longest)]
        if max_tokens is None:
            assert sorted(real) == sorted(lengths)
        else:
            assert sum(real) == max_tokens
        widths = [b.input_ids.size(1) for b in longest]
        assert widths == sorted(widths, reverse=True)
        pad = sum(b.input_ids.numel() - int(b.attention_mask.sum()) for b in longest)
        assert pad < sum(b.input_ids.numel() - int(b.attention_mask.sum()) for b in plain)


def test_cli_keep_order_and_longest_first_agree(zoo, tmp_path, capsys):
    """The default (longest first) and --keep-order batch the same examples differently; their Grams agree to
    fp32 rounding. --include-padding keeps the data order: its token counts (padding rows included) equal
    those of in-order batches."""
    root, models, texts, data = zoo
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    assert _run(capsys, models["gpt2"], "--data", data, "--out", a, "--batch-size", 4)[0] == 0
    assert _run(capsys, models["gpt2"], "--data", data, "--out", b, "--batch-size", 4, "--keep-order")[0] == 0
    assert _run(capsys, models["gpt2"], "--data", data, "--out", c, "--batch-size", 4, "--include-padding")[0] == 0
    ga, gb, gc = load_grams(a), load_grams(b), load_grams(c)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(models["gpt2"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(models["gpt2"])
    tok.pad_token = tok.pad_token or tok.eos_token
    ref_pad = collect_grams(model, hf_tiny.batches_of(tok, texts, 4, max_length=64), include_padding=True)
    for m in ga.modules():
        assert ga.count(m) == gb.count(m)
        torch.testing.assert_close(ga.gram(m), gb.gram(m), rtol=1e-5, atol=1e-5)
        assert gc.count(m) == ref_pad.count(m)  # in-order batches: the same padding rows


def test_help_teaches():
    """`grams --help`: every option explained, defaults stated, and examples that parse."""
    import argparse
    import shlex

    from regmean_fast.cli import build_parser
    from regmean_fast.grams.command import EXAMPLES

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["grams"]
    text = sub.format_help()
    for action in sub._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in action.help, action.option_strings
    assert "examples:" in text and "--resume" in text.split("examples:")[1]
    lines = EXAMPLES.replace("\\\n", " ").splitlines()  # continuation lines joined
    commands = [ln.split("python -m regmean_fast ")[1] for ln in lines if "python -m regmean_fast grams" in ln]
    assert len(commands) >= 3
    for c in commands:
        args = parser.parse_args(shlex.split(c))
        assert args.command == "grams" and args.model_dir and args.data and args.out


def test_ctrl_c_outside_the_loop_is_one_line(zoo, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the model loads (nothing to save yet), or a second Ctrl-C that aborts the loop: status
    130, one line, no traceback, no Gram file; a checkpoint already written is kept and named."""
    from regmean_fast.grams import collect as C
    from regmean_fast.io import models as G

    root, models, texts, data = zoo
    out = tmp_path / "g.safetensors"

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "load_model", ctrl_c)
    rc, err = _run(capsys, models["llama"], "--data", data, "--out", out)
    assert rc == 130 and err.strip() == "regmean_fast: interrupted; no Gram file written", err
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    real, calls = C.GramCollector.finish, []

    def abort_third(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(C.GramCollector, "finish", abort_third)
    rc, err = _run(capsys, models["llama"], "--data", data, "--out", out, "--batch-size", 2, "--checkpoint-every", 1)
    ckpt = checkpoint_path(str(out))
    assert rc == 130 and err.strip().splitlines() == [
        f"regmean_fast: interrupted; no Gram file written; the last checkpoint {ckpt} is kept: rerun with --resume"]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(ckpt)]


def test_out_inside_the_model_folder(zoo, tmp_path, capsys, monkeypatch):
    """--out inside the model folder: the checkpoint written there is no weight file, so --resume continues
    (the run's signature took every *.safetensors of the folder and refused its own checkpoint)."""
    import shutil

    root, models, texts, data = zoo
    m = tmp_path / "llama"
    shutil.copytree(models["llama"], m)
    full = tmp_path / "full.safetensors"
    assert _run(capsys, m, "--data", data, "--out", full, "--batch-size", 2)[0] == 0
    out = m / "grams.safetensors"
    monkeypatch.setenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER", "2")
    assert _run(capsys, m, "--data", data, "--out", out, "--batch-size", 2)[0] == 130
    monkeypatch.delenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER")
    rc, err = _run(capsys, m, "--data", data, "--out", out, "--batch-size", 2, "--resume")
    assert rc == 0, err
    a, b = load_grams(full), load_grams(out)
    for k in a.keys():
        assert torch.equal(a.gram(k), b.gram(k)) and a.count(k) == b.count(k)


def test_force_never_replaces_the_inputs(zoo, tmp_path, capsys):
    import shutil

    root, models, texts, data = zoo
    m = tmp_path / "llama"
    shutil.copytree(models["llama"], m)
    d = tmp_path / "d.jsonl"
    shutil.copy(data, d)
    before = {p: p.read_bytes() for p in [*m.iterdir(), d]}
    for out, what in ((m, "would replace the model folder"), (tmp_path, "would replace the model folder"),
                      (m / "model.safetensors", "would replace an input"), (d, "would replace an input")):
        rc, err = _run(capsys, m, "--data", d, "--out", out, "--force")
        assert rc == 2 and what in err and len(err.strip().splitlines()) == 1, (out, err)
    assert {p: p.read_bytes() for p in [*m.iterdir(), d]} == before
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "llama"]


def test_csv_long_fields_and_line_numbers(zoo, tmp_path, capsys):
    """A CSV document longer than the csv module's 128 KiB field limit is read (it was a _csv.Error
    traceback); errors name the file line of a row even after a quoted field spanning lines."""
    root, models, texts, data = zoo
    long_text = " ".join(["w1", "w2", "w3"] * 30000)  # 270 KB
    csvf = tmp_path / "long.csv"
    csvf.write_text(f'text\n"{long_text}"\n"{texts[0]}"\n')
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": texts[0]}) + "\n")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _run(capsys, models["llama"], "--data", csvf, "--out", a)[0] == 0
    assert _run(capsys, models["llama"], "--data", jsonl, "--out", b)[0] == 0
    ga, gb = load_grams(a), load_grams(b)
    assert ga.metadata["tokens"] == gb.metadata["tokens"] == 64 + len(texts[0].split()) + 1
    for k in gb.keys():
        assert torch.equal(ga.gram(k), gb.gram(k))
    bad = tmp_path / "multiline.csv"
    bad.write_text('text,label\n"w1 w2",1\n"w3\nw4",0\n,1\n')
    rc, err = _run(capsys, models["llama"], "--data", bad, "--out", tmp_path / "c.safetensors")
    assert rc == 2 and err.strip() == f"regmean_fast: error: {bad}: line 5: the example tokenizes to nothing", err


def test_byte_order_mark_is_not_data(zoo, tmp_path, capsys):
    """Files saved with a UTF-8 byte-order mark (Windows editors) read as without it: the CSV header's first
    column, the first JSON line and the first text line are not changed by it."""
    root, models, texts, data = zoo
    bodies = {"csv": "text\n" + "\n".join(texts[:3]) + "\n",
              "jsonl": "".join(json.dumps({"text": t}) + "\n" for t in texts[:3]),
              "txt": "\n".join(texts[:3]) + "\n"}
    ref = None
    for ext, body in bodies.items():
        for bom in ("", "\ufeff"):
            f = tmp_path / f"d{len(bom)}.{ext}"
            f.write_text(bom + body, encoding="utf-8")
            out = tmp_path / f"g-{ext}{len(bom)}.safetensors"
            rc, err = _run(capsys, models["llama"], "--data", f, "--out", out)
            assert rc == 0, (ext, bom, err)
            gs = load_grams(out)
            ref = ref or gs
            assert gs.metadata["tokens"] == ref.metadata["tokens"], (ext, bom)
            for k in ref.keys():
                assert torch.equal(gs.gram(k), ref.gram(k)), (ext, bom, k)


def test_max_examples_reads_only_what_it_uses(zoo, tmp_path, capsys):
    """--max-examples N stops reading after N examples (a bad line further on is never reached); with
    --shuffle every line is read (the sample is drawn from all of them), so the bad line is found."""
    root, models, texts, data = zoo
    d = tmp_path / "d.jsonl"
    d.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]) + "{not json\n")
    rc, err = _run(capsys, models["gpt2"], "--data", d, "--out", tmp_path / "a.safetensors", "--max-examples", 3)
    assert rc == 0, err
    assert load_grams(tmp_path / "a.safetensors").metadata["examples"] == 3
    for extra in ([], ["--max-examples", 3, "--shuffle"]):
        rc, err = _run(capsys, models["gpt2"], "--data", d, "--out", tmp_path / "b.safetensors", *extra)
        assert rc == 2 and "line 4: malformed JSON" in err, err


def test_force_replaces_either_form_of_a_file_output(zoo, tmp_path, capsys):
    """X.safetensors written sharded (index + shards), then --force unsharded, then --force sharded again:
    each time only the new form is left, and load_grams(X.safetensors) reads the new statistics."""
    root, models, texts, data = zoo
    out = tmp_path / "x.safetensors"

    def run(n, *extra):
        rc, err = _run(capsys, models["llama"], "--data", data, "--out", out, "--max-examples", n, *extra)
        assert rc == 0, err
        return sorted(f for f in os.listdir(tmp_path) if f.startswith("x"))

    sharded = run(3, "--shard-size", "20KB")
    assert "x.safetensors.index.json" in sharded and len(sharded) > 2 and "x.safetensors" not in sharded
    assert run(5, "--force") == ["x.safetensors"]
    assert load_grams(out).metadata["examples"] == 5
    again = run(7, "--force", "--shard-size", "20KB")
    assert "x.safetensors" not in again and "x.safetensors.index.json" in again
    assert load_grams(out, verify=True).metadata["examples"] == 7
    rc, err = _run(capsys, models["llama"], "--data", data, "--out", out)  # the index is the output now
    assert rc == 2 and "already exists" in err
