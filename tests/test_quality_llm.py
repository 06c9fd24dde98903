"""benchmarks/quality/llm.py's pieces on a tiny random llama: the chat rendering masks exactly the answer
tokens, and every score (answer tokens, next token, labels, fine-tuning loss) equals an independent fp64
computation, one example at a time without padding."""

import math

import pytest
import torch

from benchmarks.quality import llm
from tests.hf_tiny import make_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny():
    model, tok = make_model("llama", seed=3)
    return model.float().eval(), tok


EXAMPLES = [("w1 w2 w3", "w7"), ("w4 w5 w6 w8 w9 w10 w11", "w12 w13 w14"), ("w20", "w21 w22")]


def _encoded(tok):
    return [llm.encode(tok, llm.chat(p, a)) for p, a in EXAMPLES]


def _fp64_logprobs(model, ids):
    """log_softmax of the logits of one unpadded sequence, the model in fp64 (a copy)."""
    m64 = type(model)(model.config).double().eval()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        return torch.log_softmax(m64(input_ids=torch.tensor([ids])).logits[0].double(), -1)


def test_encode_masks_exactly_the_answer(tiny):
    _, tok = tiny
    for (prompt, answer), (ids, n_prompt) in zip(EXAMPLES, _encoded(tok)):
        want_answer = tok(f"{answer} [EOS]", add_special_tokens=False)["input_ids"]
        assert ids[n_prompt:] == want_answer
        assert tok.convert_ids_to_tokens(ids[n_prompt - 2:n_prompt]) == ["[BOS]", "assistant"]
        assert tok.decode(ids[:n_prompt]).count(prompt) == 1 and answer not in tok.decode(ids[:n_prompt])
        _, _, mask = llm.collate([(ids, n_prompt)], pad_id=0)
        assert mask[0].nonzero()[:, 0].tolist() == list(range(n_prompt, len(ids)))


def test_answer_token_logprobs_equal_fp64_loop(tiny):
    model, tok = tiny
    enc = _encoded(tok)
    with torch.no_grad():
        lp, rows = llm.answer_token_logprobs(model, *llm.collate(enc, tok.pad_token_id), bf16=False)
    got = torch.zeros(len(enc), dtype=torch.float64).index_add_(0, rows, lp.double())
    for r, (ids, n_prompt) in enumerate(enc):
        full = _fp64_logprobs(model, ids)
        want = sum(float(full[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
        assert int((rows == r).sum()) == len(ids) - n_prompt
        assert math.isclose(float(got[r]), want, rel_tol=1e-5, abs_tol=1e-5)


def test_next_token_and_label_scores_equal_fp64(tiny):
    model, tok = tiny
    enc = _encoded(tok)
    order = list(range(len(enc)))
    prompts = [(ids[:n], n) for ids, n in enc]
    with torch.no_grad():
        nxt = llm.next_token_logprobs(model, *llm.collate(prompts, tok.pad_token_id)[:2], bf16=False)
        distinct = llm.label_scores(model, tok, enc, order, ("w30", "w31 w40"), bf16=False)
        shared = llm.label_scores(model, tok, enc, order, ("w30 w41", "w30 w42 w43"), bf16=False)
    for r, (ids, n) in enumerate(enc):
        last = _fp64_logprobs(model, ids[:n])[-1]
        assert torch.allclose(nxt[r].double(), last, atol=1e-5)
        w30, w31 = tok.convert_tokens_to_ids(["w30", "w31"])
        assert distinct[r] == pytest.approx([float(last[w30]), float(last[w31])], abs=1e-5)
        for lab, score in zip(("w30 w41", "w30 w42 w43"), shared[r]):
            a = tok(lab, add_special_tokens=False)["input_ids"]
            full = _fp64_logprobs(model, ids[:n] + a)
            assert score == pytest.approx(sum(float(full[n + k - 1, t]) for k, t in enumerate(a)), abs=1e-5)


def test_general_perplexity_windows(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(llm, "general_text", lambda: " ".join(f"w{i % 37}" for i in range(50)))
    cfg = llm.Config(ppl_tokens=45, ppl_window=20, bf16=False)
    with torch.no_grad():
        got = llm.general_perplexity(model, tok, cfg)
    ids = tok(llm.general_text(), add_special_tokens=False)["input_ids"][:45]
    nll, n = 0.0, 0
    for i in range(0, 45, 20):
        w = ids[i:i + 20]
        full = _fp64_logprobs(model, w)
        nll -= sum(float(full[t - 1, w[t]]) for t in range(1, len(w)))
        n += len(w) - 1
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_normalised_mean():
    own = {"sentiment": 0.8, "topic": 0.9, "headline": 20.0}
    res = {"sentiment": 0.4, "topic": 0.9, "headline": 40.0}
    assert llm.normalised(res, own) == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def test_regmean_pp_reads_the_grams_data_as_grams_does(tmp_path, monkeypatch):
    """RegMean++'s merge gets every model's training file, in the models' order, read with the flags the
    RegMean Grams were collected with (length, batch); RegMean's merge gets the Gram files only."""
    from regmean_fast.quality import sentiment

    calls = []
    for module in (sentiment, llm):  # llm's grams() and the sentiment setup's merge() run the CLI
        monkeypatch.setattr(module, "run_cli", lambda args, log: calls.append(list(args)))
    cfg = llm.Config(max_length=96)
    log = sentiment.Log(quiet=True)
    models, train = ["m_sent", "m_topic", "m_head"], ["s.jsonl", "t.jsonl", "h.jsonl"]
    llm.grams(models[0], train[0], str(tmp_path / "g" / "s.safetensors"), cfg, log, "sentiment")
    specs = dict(llm.merge_specs(cfg))
    assert specs["RegMean++ (alpha=0.9)"] == ["--method", "regmean++", "--alpha", "0.9"]
    for i, name in enumerate(("RegMean++ (alpha=0.9)", "RegMean (alpha=0.9)")):
        llm.merge(models, ["g1", "g2", "g3"], ["f1", "f2", "f3"], train, "base", specs[name],
                  str(tmp_path / f"out{i}"), cfg, log, name)
    grams_args, pp_args, rm_args = calls

    def flag(args, name, n=1):
        i = args.index(name)
        return args[i + 1:i + 1 + n]

    assert flag(pp_args, "--models", 3) == models and flag(pp_args, "--data", 3) == train
    for name in ("--max-length", "--batch-size"):
        assert flag(pp_args, name) == flag(grams_args, name)
    assert flag(grams_args, "--max-length") == ["96"] and "--grams" not in pp_args
    assert flag(rm_args, "--grams", 3) == ["g1", "g2", "g3"] and "--data" not in rm_args
