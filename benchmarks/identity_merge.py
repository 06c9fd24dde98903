"""K copies of one model must merge back to that model: the identity check of the solve, on a tiny random
Llama (hidden 128, 2 layers) whose Grams come from 40 short examples per copy, optionally with a few
massive embedding dimensions (x30, as real LLMs have), for several alphas.

    python benchmarks/identity_merge.py [--massive 30] [--alphas 0 0.5 0.9 1.0] [--solve-dtype float32]
        [--out-dtype float32] [--models 2]

Prints, per alpha, the worst relative Frobenius error ||merged - model|| / ||model|| over the RegMean
tensors, how many exceed 1e-5, the total merge time, and the groups the report marks as escalated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--massive", type=float, default=30.0, help="scale of the massive embedding dims (1: none)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 0.9, 1.0])
    ap.add_argument("--solve-dtype", default="float32")
    ap.add_argument("--out-dtype", default="float32")
    ap.add_argument("--models", type=int, default=2)
    args = ap.parse_args()

    import regmean_fast as rf
    from hf_tiny import batches_of, make_model, random_texts
    from safetensors.torch import load_file

    root = tempfile.mkdtemp(prefix="identity_merge_")
    model, tok = make_model("llama", seed=0, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                            num_key_value_heads=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [3, 77]] *= args.massive  # a few massive dimensions
    mdir = os.path.join(root, "model")
    model.save_pretrained(mdir, safe_serialization=True)
    tok.save_pretrained(mdir)
    grams = []
    for i in range(args.models):  # the same model, statistics from different data
        gs = rf.collect_grams(model, batches_of(tok, random_texts(40, seed=i, max_words=6)))
        p = os.path.join(root, f"g{i}.safetensors")
        gs_path = rf.grams.save_grams(p, {k: gs.gram(k) for k in gs.keys()}, {k: gs.count(k) for k in gs.keys()},
                                      {m: {"key": gs.gram_key(m), "conv1d": gs.is_conv1d(m)} for m in gs.modules()},
                                      gs.fingerprint, gs.metadata)
        grams.append(gs_path)
    ref = load_file(os.path.join(mdir, "model.safetensors"))
    print(f"# {args.models} copies of a tiny Llama (hidden 128), massive dims x{args.massive:g}, "
          f"solve {args.solve_dtype}, out {args.out_dtype}")
    print(f"{'alpha':>5} {'worst rel err':>13} {'> 1e-5':>7} {'time s':>7}  escalated / notes")
    for alpha in args.alphas:
        out = os.path.join(root, f"out{alpha}")
        t0 = time.perf_counter()
        rf.merge({"models": [{"model": mdir, "grams": g} for g in grams], "parameters": {"alpha": alpha},
                  "solve_dtype": args.solve_dtype, "out_dtype": args.out_dtype}, out=out)
        dt = time.perf_counter() - t0
        got = load_file(os.path.join(out, "model.safetensors"))
        rep = json.load(open(os.path.join(out, "merge_report.json")))
        errs = {}
        for n, e in rep["tensors"].items():
            if e.get("method") == "regmean":
                a, b = got[n].double(), ref[n].double()
                errs[n] = float((a - b).norm() / b.norm())
        worst = max(errs.values())
        bad = sum(v > 1e-5 for v in errs.values())
        esc = sorted({str(e.get("gram")) + ":" + str(e.get("solve"))
                      for e in rep["tensors"].values() if e.get("method") == "regmean"
                      and (e.get("escalated") or e.get("solve") != "cholesky")})
        print(f"{alpha:>5g} {worst:>13.2e} {bad:>3}/{len(errs):<3} {dt:>7.2f}  {', '.join(esc) or '-'}", flush=True)


if __name__ == "__main__":
    main()
