import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

from regmean_fast import load_grams  # noqa: E402
from regmean_fast.cli import main  # noqa: E402


def _manual_fisher(model, ids_list, labels=None):
    F = {}
    for i, ids in enumerate(ids_list):
        model.zero_grad()
        ids = torch.tensor([ids])
        logits = model(input_ids=ids).logits.double()
        if labels is None:
            lp = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None]).sum()
        else:
            y = int(logits[0].argmax()) if labels[i] is None else labels[i]  # no label: the model's prediction
            lp = torch.log_softmax(logits[0], -1)[y]
        lp.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                F[n] = F.get(n, 0) + p.grad.double() ** 2
    return F


def _check(kind, tmp_path, capsys, with_labels):
    m = hf_tiny.save_tiny(tmp_path / kind, kind)
    texts = hf_tiny.random_texts(5, seed=2)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "g.safetensors"
    rc = main(["grams", m, "--data", str(data), "--out", str(out), "--fisher", "--batch-size", "2",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    gs = load_grams(out, verify=True)
    assert gs.has_fisher and gs.metadata["fisher_examples"] == 5
    model, tok = hf_tiny.make_model(kind)
    ids = [tok(t)["input_ids"] for t in texts]
    ref = _manual_fisher(model, ids, [i % 2 for i in range(5)] if with_labels else None)
    assert set(gs.fisher_params()) == set(ref)
    for n, R in ref.items():
        torch.testing.assert_close(gs.fisher(n).double(), R, rtol=1e-3, atol=1e-9)
    # the Grams are untouched by the Fisher passes
    plain = tmp_path / "p.safetensors"
    assert main(["grams", m, "--data", str(data), "--out", str(plain), "--batch-size", "2", "--no-progress"]) == 0
    gp = load_grams(plain)
    for k in gp.keys():
        assert torch.equal(gp.gram(k), gs.gram(k)) and gp.count(k) == gs.count(k)


def test_fisher_causal_lm(tmp_path, capsys):
    _check("gpt2", tmp_path, capsys, with_labels=False)


def test_fisher_classifier_labels(tmp_path, capsys):
    _check("llama-cls", tmp_path, capsys, with_labels=True)


def test_fisher_resume_identical(tmp_path, capsys, monkeypatch):
    """Interrupted and resumed with --fisher: the same bytes as an uninterrupted run (the Fisher sums come
    back from the checkpoint in another order; the file must not depend on it)."""
    from regmean_fast.grams.checkpoint import checkpoint_path

    m = hf_tiny.save_tiny(tmp_path / "gpt2", "gpt2")
    data = tmp_path / "d.txt"
    data.write_text("\n".join(hf_tiny.random_texts(7, seed=4)) + "\n")

    def run(out, *extra):
        return main(["grams", m, "--data", str(data), "--out", str(out), "--fisher", "--batch-size", "2",
                     "--no-progress", *extra])

    assert run(tmp_path / "full.safetensors") == 0
    part = tmp_path / "part.safetensors"
    monkeypatch.setenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER", "2")
    assert run(part) == 130 and os.path.exists(checkpoint_path(str(part)))
    monkeypatch.delenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER")
    assert run(part, "--resume") == 0, capsys.readouterr().err
    assert (tmp_path / "full.safetensors").read_bytes() == part.read_bytes()


def test_fisher_labels_names_missing_and_refused(tmp_path, capsys):
    """Per example: a label name (config label2id), no label (the prediction), an index; in one batch (a batch
    with one missing label used to take predictions for all). A label that is no class: one line, status 2."""
    m = hf_tiny.save_tiny(tmp_path / "cls", "llama-cls")
    texts = hf_tiny.random_texts(3, seed=6)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": texts[0], "label": "LABEL_1"}) + "\n" + json.dumps({"text": texts[1]})
                    + "\n" + json.dumps({"text": texts[2], "label": 0}) + "\n")
    out = tmp_path / "g.safetensors"
    rc = main(["grams", m, "--data", str(data), "--out", str(out), "--fisher", "--batch-size", "3", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    gs = load_grams(out, verify=True)
    assert gs.metadata["fisher_labels"] == "data, predicted where missing"
    model, tok = hf_tiny.make_model("llama-cls")
    ref = _manual_fisher(model, [tok(t)["input_ids"] for t in texts], [1, None, 0])
    for n, R in ref.items():
        torch.testing.assert_close(gs.fisher(n).double(), R, rtol=1e-3, atol=1e-9)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": texts[0], "label": 1}) + "\n" + json.dumps({"text": texts[1], "label": 2})
                   + "\n")
    capsys.readouterr()
    rc = main(["grams", m, "--data", str(bad), "--out", str(tmp_path / "h.safetensors"), "--fisher", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"regmean_fast: error: {bad}: line 2: label 2 is not a class index in 0..1 or name"
    assert not os.path.exists(tmp_path / "h.safetensors")


def test_fisher_chat_answers_only(tmp_path, capsys):
    """Chat examples that end with the assistant's turn: the log-likelihood of the answer's tokens given the
    conversation before it, as chat fine-tuning trains (the prompt is context, not predicted)."""
    m = hf_tiny.save_tiny(tmp_path / "gpt2", "gpt2")
    texts = hf_tiny.random_texts(8, seed=4)
    convs = [[{"role": "user", "content": texts[2 * i]}, {"role": "assistant", "content": texts[2 * i + 1]}]
             for i in range(4)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    out = tmp_path / "g.safetensors"
    rc = main(["grams", m, "--data", str(data), "--out", str(out), "--fisher", "--batch-size", "3", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    gs = load_grams(out, verify=True)
    assert gs.metadata["fisher_examples"] == 4 and gs.metadata["fisher_labels"] == "next-token, chat answers only"
    model, tok = hf_tiny.make_model("gpt2")
    F: dict = {}
    F_mean: dict = {}
    for c in convs:  # the answer begins after "[BOS] user <text> [EOS] [BOS] assistant", written out here
        prompt = tok(f"[BOS] user {c[0]['content']} [EOS] [BOS] assistant", add_special_tokens=False)["input_ids"]
        answer = tok(f"{c[1]['content']} [EOS]", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        for acc, reduce in ((F, torch.sum), (F_mean, torch.mean)):
            model.zero_grad()
            logp = torch.log_softmax(model(input_ids=ids).logits.double()[0, :-1], -1)
            targets = ids[0, 1:]
            lp = reduce(logp[len(prompt) - 1:].gather(1, targets[len(prompt) - 1:, None]))  # answer tokens only
            lp.backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    acc[n] = acc.get(n, 0) + p.grad.double() ** 2
    for n, R in F.items():
        torch.testing.assert_close(gs.fisher(n).double(), R, rtol=1e-3, atol=1e-9)
    # --fisher-tokens mean: each example's log-likelihood is the mean over its answer's tokens
    out_mean = tmp_path / "g_mean.safetensors"
    rc = main(["grams", m, "--data", str(data), "--out", str(out_mean), "--fisher", "--fisher-tokens", "mean",
               "--batch-size", "3", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    gm = load_grams(out_mean, verify=True)
    assert gm.metadata["fisher_labels"] == "next-token, chat answers only, mean over the tokens"
    for n, R in F_mean.items():
        torch.testing.assert_close(gm.fisher(n).double(), R, rtol=1e-3, atol=1e-9)
    assert not torch.allclose(gm.fisher(n).double(), F[n], rtol=1e-2)  # (answers of several tokens: not the sum)
    capsys.readouterr()
    assert main(["grams", m, "--data", str(data), "--out", str(tmp_path / "x.safetensors"), "--fisher-tokens",
                 "mean", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "regmean_fast: error: --fisher-tokens goes with --fisher", err
    assert not os.path.exists(tmp_path / "x.safetensors")
