"""RegMean++ against RegMean (statistics + merge) on one set of inputs, in the same run: wall time and peak RSS.

    python benchmarks/bench_regmean_pp.py [--models 3] [--hidden 256] [--layers 4] [--examples 256] [--repeats 2]

K random Llama models (tests/hf_tiny.py, its word-level tokenizer) and K data files are made once; each side
then runs in its own subprocess through the CLI (`regmean_fast.cli.main`), which reports its wall time and its
ru_maxrss (so every side pays its own imports, and the peak is its own):

    regmean        grams (whole model) for each model, then merge --grams
    regmean-seq    grams --sequential for each model, then merge --grams
    regmean++      merge --method regmean++ --data (no Gram files)
    fb-style++     a RegMean++ loop as FusionBench's regmean_plusplus runs it (written here, not its code): all K
                   models and the merged one loaded in memory, each layer's inputs cached per model, Grams by
                   torch matmul (padding rows left out, as ours), one torch.inverse per Linear, the heads
                   averaged; the merged model saved with save_pretrained. Its blocks are compared with ours

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


class _FirstLayerInputs(Exception):
    """Raised by the first layer's pre-hook: its inputs are all the forward is run for."""


def _fusionbench_style(models: list, data: list, out: str, alpha: float = 0.9) -> None:
    import copy

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    ms = [LlamaForCausalLM.from_pretrained(m, dtype=torch.float32).eval() for m in models]
    merged = copy.deepcopy(ms[0])
    k = len(ms)
    with torch.no_grad():
        sds = [m.state_dict() for m in ms]
        outside = {n: sum(sd[n] for sd in sds) / k for n in sds[0] if ".layers." not in n}
        merged.load_state_dict({**merged.state_dict(), **outside})
        inputs = []  # per model: per batch (hidden states, layer kwargs) entering the current layer
        for m, d in zip(models, data):
            tok = AutoTokenizer.from_pretrained(m)
            texts = [t for t in open(d).read().splitlines() if t.strip()]
            cached = []  # (hidden states, layer kwargs, the rows that are tokens)
            mask = []

            def grab(module, args, kwargs):
                cached.append((args[0], kwargs, mask[-1]))
                raise _FirstLayerInputs

            h = merged.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
            for j in range(0, len(texts), 8):
                enc = tok(texts[j:j + 8], padding=True, truncation=True, max_length=64, return_tensors="pt")
                mask.append(enc["attention_mask"].bool())
                try:
                    merged(**enc, use_cache=False)
                except _FirstLayerInputs:
                    pass
            h.remove()
            inputs.append(cached)
        for li, layer in enumerate(merged.model.layers):
            linears = [n for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)]
            grams = []
            for i, m in enumerate(ms):
                own = m.model.layers[li]
                acc = {n: 0 for n in linears}
                tokens = [None]

                def add(mod, args, n):
                    x = args[0][tokens[0]]
                    acc[n] = acc[n] + x.T @ x

                hooks = [mod.register_forward_pre_hook(lambda mod, args, n=n: add(mod, args, n))
                         for n, mod in own.named_modules() if n in acc]
                rows = 0
                for x, kw, keep in inputs[i]:
                    tokens[0] = keep
                    own(x, **kw)
                    rows += int(keep.sum())
                for hk in hooks:
                    hk.remove()
                grams.append({n: g / rows for n, g in acc.items()})
            sd = layer.state_dict()
            layer_sds = [m.model.layers[li].state_dict() for m in ms]
            for n in sd:
                mod = n[: -len(".weight")]
                if n.endswith(".weight") and mod in linears:
                    gs = [g[mod] for g in grams]
                    gs = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in gs]
                    rhs = sum(g @ lsd[n].T for g, lsd in zip(gs, layer_sds))
                    sd[n] = (torch.inverse(sum(gs)) @ rhs).T
                else:
                    sd[n] = sum(lsd[n] for lsd in layer_sds) / k
            layer.load_state_dict(sd)
            inputs = [[(layer(x, **kw), kw, keep) for x, kw, keep in cached] for cached in inputs]
    merged.save_pretrained(out)


def _child(side: str, spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if side == "fb-style++":
        t0 = time.perf_counter()
        _fusionbench_style(spec["models"], spec["data"], os.path.join(spec["root"], "out-fb"))
        return {"rc": 0, "wall_s": time.perf_counter() - t0,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
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


def _max_block_diff(root: str) -> float:
    from safetensors.torch import load_file

    ours = load_file(os.path.join(root, "out-regmean++", "model.safetensors"))
    fb = load_file(os.path.join(root, "out-fb", "model.safetensors"))
    return max(float((ours[n].double() - fb[n].double()).abs().max() / fb[n].double().abs().max())
               for n in ours if ".layers." in n)


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
        sides = ("regmean", "regmean-seq", "regmean++", "fb-style++")
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
        print(f"regmean++ / fb-style++: time {best['regmean++'] / best['fb-style++']:.2f}x, peak RSS "
              f"{rss['regmean++'] / rss['fb-style++']:.2f}x; their blocks differ by at most "
              f"{_max_block_diff(root):.1e} (max |a - b| / max |b| per tensor)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
