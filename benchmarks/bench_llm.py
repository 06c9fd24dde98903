"""Real decoder LLMs through both commands: what tiny random models cannot show.

    python -m benchmarks.bench_llm                          # all three models (prepared once: llm_models.py)
    python -m benchmarks.bench_llm --models gemma-3-270m --examples 16

For each real model (SmolLM2-135M-Instruct: llama, tied head; Qwen2.5-Coder-0.5B-Instruct: qwen2, GQA
14/2, 151936-token vocabulary; gemma-3-270m: gemma3, sliding-window layers, tied head), on real text (the
VADER tweets and movie-review sentences; chat-formatted where the tokenizer has a chat template):

  1. `grams` whole-model and `grams --sequential` (fp32 forward): wall time of each and the largest
     relative difference between their Grams (they compute the same sums: 0 or fp32 rounding);
  2. `merge --models M M` with the two data sets' Gram files: K copies of one model must give it back,
     so the largest relative error of any tensor against the model is the merge's own numerical error
     (the solve's, with the bf16 output rounding on top); the merge report's solve methods;
  3. the merged folder loads, keeps a tied head tied, and greedy-generates the same first tokens as the
     model for one prompt.

Prints a Markdown table and writes it with the raw numbers to benchmarks/results/llm.json. The weights are
dequantised from 4-5 bit GGUF files (llm_models.py): real architectures, slightly degraded weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _data(root: str, n: int, chat: bool) -> list[str]:
    from regmean_fast.quality.fetch import vader_domains

    files = []
    domains = vader_domains()
    for name in ("tweets", "movie"):
        path = os.path.join(root, f"{name}.{'chat' if chat else 'text'}.jsonl")
        with open(path, "w") as f:
            for text, label in domains[name][:n]:
                if chat:
                    row = {"messages": [{"role": "user", "content": f"Positive or negative? {text}"},
                                        {"role": "assistant", "content": "positive" if label else "negative"}]}
                else:
                    row = {"text": text}
                f.write(json.dumps(row) + "\n")
        files.append(path)
    return files


def _cli(*args) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "regmean_fast", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench_llm: {' '.join(map(str, args[:2]))} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t


def _tensors(folder: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def run_model(name: str, work: str, examples: int, batch: int, max_length: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.llm_models import model_dir
    from regmean_fast import load_grams

    model = model_dir(name)
    tok = AutoTokenizer.from_pretrained(model)
    chat = bool(getattr(tok, "chat_template", None))
    root = os.path.join(work, name)
    os.makedirs(root, exist_ok=True)
    data = _data(root, examples, chat)
    common = ["--batch-size", batch, "--max-length", max_length, "--no-progress", "--force"]
    row: dict = {"model": name, "data": "chat" if chat else "text", "examples": examples}
    grams = []
    for i, d in enumerate(data):
        out = os.path.join(root, f"g{i}.safetensors")
        row[f"grams_s_{i}"] = _cli("grams", model, "--data", d, "--out", out, *common)
        grams.append(out)
    seq = os.path.join(root, "g0.seq.safetensors")
    row["grams_sequential_s"] = _cli("grams", model, "--data", data[0], "--out", seq, "--sequential", *common)
    whole, sequential = load_grams(grams[0]), load_grams(seq)
    row["grams"] = len(whole.keys())
    row["tokens"] = whole.metadata["tokens"]
    row["whole_vs_sequential"] = max(float((whole.gram(k) - sequential.gram(k)).abs().max()
                                           / whole.gram(k).abs().max()) for k in whole.keys())
    merged = os.path.join(root, "merged")
    row["merge_s"] = _cli("merge", "--models", model, model, "--grams", *grams, "--out", merged, "--force")
    src, got = _tensors(model), _tensors(merged)
    errs = sorted(((float((got[n].double() - t.double()).norm() / t.double().norm().clamp_min(1e-30)), n)
                   for n, t in src.items()), reverse=True)
    row["self_merge_worst"], row["self_merge_worst_tensor"] = errs[0]
    row["self_merge_median"] = errs[len(errs) // 2][0]
    report = json.load(open(os.path.join(merged, "merge_report.json")))
    methods: dict = {}
    for e in report["tensors"].values():
        m = e.get("solve")
        m = m.get("method") if isinstance(m, dict) else m
        if m:
            methods[m] = methods.get(m, 0) + 1
    row["solve_methods"] = methods
    row["warnings"] = len(report.get("warnings", []))
    m0 = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    m1 = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tied = m0.config.tie_word_embeddings
    row["tied_head_kept"] = (not tied) or (m1.get_output_embeddings().weight is m1.get_input_embeddings().weight
                                           and "lm_head.weight" not in got)
    prompt = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        a = m0.generate(**prompt, max_new_tokens=8, do_sample=False)
        b = m1.generate(**prompt, max_new_tokens=8, do_sample=False)
    row["same_greedy_tokens"] = bool(torch.equal(a, b))
    row["merged_says"] = tok.decode(b[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    return row


def main(argv=None) -> int:
    from benchmarks.llm_models import MODELS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--examples", type=int, default=64, help="examples per data set (default: 64)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "regmean_fast", "bench_llm"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "llm.json"))
    args = ap.parse_args(argv)
    from benchmarks.common import machine_info

    rows = []
    for name in args.models:
        rows.append(run_model(name, args.work, args.examples, args.batch_size, args.max_length))
        print(json.dumps(rows[-1]), flush=True)
    head = ("| model | data | Grams (tokens) | grams s (whole / --sequential) | whole vs sequential | merge M M s | "
            "self-merge worst (median) rel. error | solve | tied head kept | same greedy tokens |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['model']} | {r['data']} x {r['examples']} | {r['grams']} ({r['tokens']}) | "
                     f"{r['grams_s_0']:.1f} / {r['grams_sequential_s']:.1f} | {r['whole_vs_sequential']:.1e} | "
                     f"{r['merge_s']:.1f} | {r['self_merge_worst']:.1e} ({r['self_merge_median']:.1e}) | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(r['solve_methods'].items()))} | "
                     f"{r['tied_head_kept']} | {r['same_greedy_tokens']} |")
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info(), "rows": rows, "table": lines}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
