"""regmean_fast against mergekit on the same YAML files and models: wall time and peak RSS, interleaved.

    PYTHONPATH=<a folder with mergekit 0.1.5> python benchmarks/bench_mergekit.py
        [--hidden 1024 --intermediate 2816 --layers 20 --vocab 32000]   # ~320M parameters per model
        [--methods linear ties dare_ties] [--repeats 2]

Runs only where mergekit is importable (it prints how to get it otherwise). Four synthetic bf16 Llama folders
(benchmarks/bench_merge.make_inputs: model0 is the base of ties / dare_ties, models 1-3 are merged), one YAML per
method in mergekit's format (dtype bfloat16, density 0.5, weight 1), then per repeat mergekit and regmean_fast
in turn, each in a fresh process (`mergekit.merge.run_merge` on the CPU, lazy loading, no tokenizer copy;
`python -m regmean_fast merge CONFIG --out DIR`). Prints the medians, the ratios and the largest difference of
the two outputs (linear and ties agree to rounding; dare draws different random masks in each tool), compared in
a child process so that this one stays small (a child's peak RSS starts from its parent's). The figures, and the
load they were measured under: README.md, "Against mergekit 0.1.5". On a shared machine quote `uptime` with them:
both tools run torch, and a busy second core slows every multi-threaded operation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MERGEKIT = """import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
cfg = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
run_merge(cfg, sys.argv[2], options=MergeOptions(copy_tokenizer=False, lazy_unpickle=True, random_seed=0))
"""


def config(method: str, paths: list) -> dict:
    base, models = paths[0], paths[1:]
    if method == "linear":
        return {"merge_method": "linear", "dtype": "bfloat16",
                "models": [{"model": p, "parameters": {"weight": 1.0}} for p in models]}
    return {"merge_method": method, "base_model": base, "dtype": "bfloat16", "parameters": {"normalize": True},
            "models": [{"model": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in models]}


def max_rel_diff(a: str, b: str) -> float:
    import torch
    from safetensors.torch import load_file

    def read(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, f)))
        return out

    ta, tb = read(a), read(b)
    worst = 0.0
    for n, t in tb.items():
        x, y = ta[n].double(), t.double()
        worst = max(worst, float((x - y).norm() / y.norm().clamp_min(1e-30)))
    del torch
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--kv-heads", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["linear", "ties", "dare_ties"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    try:
        import mergekit.merge  # noqa: F401
    except ImportError:
        raise SystemExit("mergekit is not importable: pip install --target DIR mergekit==0.1.5 (no-deps is enough "
                         "with this venv), then PYTHONPATH=DIR python benchmarks/bench_mergekit.py")
    import yaml

    from common import CLI, cpu_description, run_measured

    model, flags = cpu_description()
    root = tempfile.mkdtemp(prefix="bench_mergekit_", dir=args.workdir)
    try:
        gen = subprocess.run([sys.executable, os.path.join(HERE, "bench_merge.py"), "_gen", root, "4",
                              str(args.hidden), str(args.intermediate), str(args.layers), str(args.vocab),
                              str(args.kv_heads), "0", "nograms"], capture_output=True, text=True)
        if gen.returncode != 0:
            raise SystemExit(gen.stderr[-3000:])
        paths = [os.path.join(root, f"model{i}") for i in range(4)]
        size = os.path.getsize(os.path.join(paths[0], "model.safetensors"))
        print(f"# {os.cpu_count()} CPUs ({model}; {' '.join(flags)}); 3 bf16 Llama models (+ base) of "
              f"{size / 2 / 1e6:.0f}M parameters: hidden {args.hidden}, intermediate {args.intermediate}, "
              f"{args.layers} layers, vocab {args.vocab}; medians of {args.repeats}, the tools alternated")
        print(f"{'method':>10} {'mergekit s':>11} {'ours s':>8} {'speed-up':>9} {'mergekit MB':>12} {'ours MB':>8} "
              f"{'RSS ratio':>10} {'max rel diff':>13}")
        for method in args.methods:
            y = os.path.join(root, f"{method}.yaml")
            with open(y, "w") as f:
                yaml.safe_dump(config(method, paths), f, sort_keys=False)
            res = {"mergekit": [], "ours": []}
            for r in range(args.repeats):
                for side in ("mergekit", "ours"):
                    out = os.path.join(root, f"out_{method}_{side}")
                    shutil.rmtree(out, ignore_errors=True)
                    if side == "mergekit":
                        res[side].append(run_measured(MERGEKIT, [y, out]))
                    else:
                        res[side].append(run_measured(CLI, ["merge", y, "--out", out]))
            # In a child: this process stays small (a child's peak RSS starts from the parent's at the fork;
            # reading both outputs here made every later method's figures ~2.1 GB at least).
            diff = float(subprocess.run(
                [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from bench_mergekit import "
                 "max_rel_diff; print(max_rel_diff(sys.argv[2], sys.argv[3]))", HERE,
                 os.path.join(root, f"out_{method}_ours"), os.path.join(root, f"out_{method}_mergekit")],
                capture_output=True, text=True, check=True).stdout.split()[-1])
            t = {s: statistics.median(x["time_s"] for x in v) for s, v in res.items()}
            m = {s: statistics.median(x["peak_rss_mb"] for x in v) for s, v in res.items()}
            print(f"{method:>10} {t['mergekit']:>11.1f} {t['ours']:>8.1f} {t['mergekit'] / t['ours']:>8.2f}x "
                  f"{m['mergekit']:>12.0f} {m['ours']:>8.0f} {m['ours'] / m['mergekit']:>10.2f} {diff:>13.2e}",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
