"""`grams --sequential` at Llama-3-8B shapes on this machine: time and peak memory per decoder block.

    python benchmarks/bench_sequential.py [--layer-counts 2 4] [--examples 16 --tokens 256] [--dtype bf16]
        [--hidden 4096 --intermediate 14336 --kv-heads 8 --vocab 128256]

For each layer count, one synthetic Llama folder (random bf16 weights, benchmarks/bench_merge.make_inputs;
the word-level tokenizer of tests/hf_tiny.py) and a JSONL of random texts of --tokens words; then the
command itself, in its own process: `python -m regmean_fast grams DIR --data D --out G --sequential`.
Prints wall time and peak RSS (of that process) per layer count, the per-block slope between the first two
counts, and what the goal counts: one block (in the run's dtype) + one batch of activations + the Grams.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def run_grams(folder: str, data: str, out: str, args) -> dict:
    """The command in a fresh process started from this small parent (the inputs come from another child):
    its wall time and its own peak RSS."""
    from common import CLI, run_measured

    return run_measured(CLI, ["grams", folder, "--data", data, "--out", out, "--sequential", "--batch-size",
                              args.batch_size, "--max-length", args.tokens, "--dtype", args.dtype, "--no-progress"])


def generate(layers: int, root: str, args) -> str:
    """The synthetic folder and its data in a child process -> the folder."""
    import torch  # noqa: F401  (the child's imports)
    from bench_merge import make_inputs
    from hf_tiny import make_tokenizer, random_texts

    (folder,), _ = make_inputs(root, 1, args.hidden, args.intermediate, layers, args.vocab, args.kv_heads,
                               with_grams=False)
    make_tokenizer().save_pretrained(folder)
    with open(os.path.join(root, "data.jsonl"), "w") as f:
        for t in random_texts(args.examples, seed=1, min_words=args.tokens, max_words=args.tokens):
            f.write(json.dumps({"text": t}) + "\n")
    return folder


def one(layers: int, args) -> dict:
    root = tempfile.mkdtemp(prefix="bench_seq_", dir=args.workdir)
    try:
        gen = subprocess.run([sys.executable, __file__, "--_gen", str(layers), "--_root", root] + sys.argv[1:],
                             capture_output=True, text=True)
        if gen.returncode != 0:
            raise RuntimeError(gen.stderr[-3000:])
        folder = gen.stdout.strip().splitlines()[-1]
        r = run_grams(folder, os.path.join(root, "data.jsonl"), os.path.join(root, "g.safetensors"), args)
        r["grams_mb"] = os.path.getsize(os.path.join(root, "g.safetensors")) / 2**20
        r["model_mb"] = os.path.getsize(os.path.join(folder, "model.safetensors")) / 2**20
        return r
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer-counts", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256, help="words (= tokens) per example")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--_gen", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._gen is not None:
        print(generate(args._gen, args._root, args))
        return
    from common import cpu_description

    model, flags = cpu_description()
    print(f"# {os.cpu_count()} CPUs ({model}; {' '.join(flags)}); grams --sequential --dtype {args.dtype}, "
          f"Llama hidden {args.hidden}, intermediate {args.intermediate}, kv heads {args.kv_heads}, vocab "
          f"{args.vocab}; {args.examples} examples x {args.tokens} tokens, batch {args.batch_size}")
    print(f"{'layers':>6} {'model MB':>9} {'grams MB':>9} {'time s':>8} {'peak RSS MB':>12}")
    rows = []
    for L in args.layer_counts:
        res = one(L, args)
        rows.append((L, res))
        print(f"{L:>6} {res['model_mb']:>9.0f} {res['grams_mb']:>9.0f} {res['time_s']:>8.1f} "
              f"{res['peak_rss_mb']:>12.0f}", flush=True)
    if len(rows) >= 2:
        (l0, a), (l1, b) = rows[0], rows[1]
        per = (b["time_s"] - a["time_s"]) / (l1 - l0)
        mem = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (l1 - l0)
        block_mb = (b["model_mb"] - a["model_mb"]) / (l1 - l0) * (2 if args.dtype == "fp32" else 1)
        grams_mb = (b["grams_mb"] - a["grams_mb"]) / (l1 - l0)
        acts_mb = args.batch_size * args.tokens * args.intermediate * 4 / 2**20
        print(f"per block (slope {l0} -> {l1} layers): {per:.1f} s, peak RSS +{mem:.0f} MB; one block in the run's "
              f"dtype {block_mb:.0f} MB, its Grams {grams_mb:.0f} MB (fp32 upper triangles), one batch's widest "
              f"activation {acts_mb:.0f} MB")


if __name__ == "__main__":
    main()
