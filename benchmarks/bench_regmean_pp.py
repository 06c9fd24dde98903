"""RegMean++ against RegMean (statistics + merge) on one set of inputs, in the same run: wall time and peak RSS.

    python benchmarks/bench_regmean_pp.py [--models 3] [--hidden 256] [--layers 4] [--examples 256] [--repeats 2]

K random Llama models (tests/hf_tiny.py, its word-level tokenizer) and K data files are made once; each side
then runs in its own subprocess through the CLI (`regmean_fast.cli.main`), which reports its wall time and its
ru_maxrss (so every side pays its own imports, and the peak is its own):

    regmean        grams (whole model) for each model, then merge --grams
    regmean-seq    grams --sequential for each model, then merge --grams
    regmean++      merge --method regmean++ --data (no Gram files)

The sides alternate over --repeats rounds; the table gives each side's best time and its peak RSS, and the
ratios to `regmean` measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _make_inputs(root: str, k: int, hidden: int, layers: int, examples: int) -> tuple[list, list]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import hf_tiny

    heads = max(2, hidden // 32)
    models, data = [], []
    for i in range(k):
        m = os.path.join(root, f"m{i}")
        hf_tiny.save_tiny(m, "llama", seed=i, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                          head_dim=hidden // heads)
        d = os.path.join(root, f"d{i}.txt")
        with open(d, "w") as f:
            f.write("\n".join(hf_tiny.random_texts(examples, seed=100 + i, min_words=8, max_words=40)) + "\n")
        models.append(m)
        data.append(d)
    return models, data


def _child(side: str, spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from regmean_fast.cli import main

    root, models, data = spec["root"], spec["models"], spec["data"]
    out = os.path.join(root, f"out-{side}")
    common = ["--batch-size", "8", "--max-length", "64"]
    t0 = time.perf_counter()
    if side == "regmean++":
        rc = main(["merge", "--method", "regmean++", "--models", *models, "--data", *data, "--out", out, "--force",
                   *common])
    else:
        grams = []
        for i, (m, d) in enumerate(zip(models, data)):
            g = os.path.join(root, f"{side}-g{i}.safetensors")
            rc = main(["grams", m, "--data", d, "--out", g, "--force", "--no-progress", *common,
                       *(["--sequential"] if side == "regmean-seq" else [])])
            if rc:
                break
            grams.append(g)
        else:
            rc = main(["merge", "--models", *models, "--grams", *grams, "--out", out, "--force"])
    wall = time.perf_counter() - t0
    return {"rc": rc, "wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def _measure(side: str, spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "_child", side, json.dumps(spec)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    if r.returncode != 0:
        raise SystemExit(f"{side} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"]:
        raise SystemExit(f"{side}: exit status {res['rc']}:\n{r.stderr[-3000:]}")
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        print(json.dumps(_child(sys.argv[2], json.loads(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--examples", type=int, default=256, help="examples per model (8-40 words each)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench_regmean_pp_")
    try:
        models, data = _make_inputs(root, args.models, args.hidden, args.layers, args.examples)
        spec = {"root": root, "models": models, "data": data, "threads": args.threads}
        sides = ("regmean", "regmean-seq", "regmean++")
        runs: dict = {s: [] for s in sides}
        for _ in range(args.repeats):
            for s in sides:
                runs[s].append(_measure(s, spec))
        print(f"{args.models} random Llama models, hidden {args.hidden}, {args.layers} layers, {args.examples} "
              f"examples each (batch 8, max length 64), {args.threads} threads; best of {args.repeats}")
        best = {s: min(r["wall_s"] for r in runs[s]) for s in sides}
        rss = {s: max(r["peak_rss_mb"] for r in runs[s]) for s in sides}
        print(f"{'side':<12} {'time s':>8} {'x regmean':>10} {'peak RSS MB':>12} {'x regmean':>10}")
        for s in sides:
            print(f"{s:<12} {best[s]:>8.2f} {best[s] / best['regmean']:>10.2f} {rss[s]:>12.0f} "
                  f"{rss[s] / rss['regmean']:>10.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
