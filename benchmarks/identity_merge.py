"""K copies of one model must merge back to that model: the identity check of the solve, on a tiny random
Llama (hidden 128, 2 layers) whose Grams come from 40 short examples per copy, optionally with a few
massive embedding dimensions (x30, as real LLMs have), for several alphas.

    python benchmarks/identity_merge.py [--massive 30] [--alphas 0 0.5 0.9 1.0] [--solve-dtype float32]
        [--out-dtype float32] [--models 2] [--spread 0.01]

Prints, per alpha, the worst relative Frobenius error ||merged - model|| / ||model|| over the RegMean
tensors, how many exceed 1e-5, the total merge time, and the groups the report marks as escalated or shifted.
--spread S: the copies differ (each weight + S * its std * noise), and the error is against the same merge
with --solve-dtype float64; the time of the merge with the fp64 escalation switched off is printed too.
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
    ap.add_argument("--spread", type=float, default=0.0)
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
    mdirs = [mdir] * args.models
    if args.spread:
        g = torch.Generator().manual_seed(7)
        mdirs = []
        for i in range(args.models):
            m, _ = make_model("llama", seed=0, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                              num_key_value_heads=2)
            m.load_state_dict(model.state_dict())
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(args.spread * p.std() * torch.randn(p.shape, generator=g))
            mdirs.append(os.path.join(root, f"model{i}"))
            m.save_pretrained(mdirs[-1], safe_serialization=True)
            tok.save_pretrained(mdirs[-1])
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
    print(f"{'alpha':>5} {'worst rel err':>13} {'> 1e-5':>7} {'time s':>7}  shifted or escalated (/fp64) groups")

    def run(alpha, out, solve_dtype):
        t0 = time.perf_counter()
        rf.merge({"models": [{"model": d, "grams": g} for d, g in zip(mdirs, grams)], "parameters": {"alpha": alpha},
                  "solve_dtype": solve_dtype, "out_dtype": args.out_dtype}, out=out)
        return time.perf_counter() - t0

    for alpha in args.alphas:
        out = os.path.join(root, f"out{alpha}")
        dt = run(alpha, out, args.solve_dtype)
        got = load_file(os.path.join(out, "model.safetensors"))
        if args.spread:
            run(alpha, out + "-fp64", "float64")
            ref = load_file(os.path.join(out + "-fp64", "model.safetensors"))
            tol = rf.solve.PRECISION_TOL
            rf.solve.PRECISION_TOL = float("inf")  # the plain fp32 solve, no escalation: its time and error
            try:
                dt_plain = run(alpha, out + "-plain", "float32")
            finally:
                rf.solve.PRECISION_TOL = tol
            plain = load_file(os.path.join(out + "-plain", "model.safetensors"))
            worst_plain = max(float((plain[n].double() - ref[n].double()).norm() / ref[n].double().norm())
                              for n in ref)
            print(f"      without escalation: worst rel err {worst_plain:.2e}, {dt_plain:.2f} s")
        rep = json.load(open(os.path.join(out, "merge_report.json")))
        errs = {}
        for n, e in rep["tensors"].items():
            if e.get("method") == "regmean":
                a, b = got[n].double(), ref[n].double()
                errs[n] = float((a - b).norm() / b.norm())
        worst = max(errs.values())
        bad = sum(v > 1e-5 for v in errs.values())
        esc = sorted({str(e.get("gram")) + ":" + str(e.get("solve")) + ("/fp64" if e.get("escalated") else "")
                      for e in rep["tensors"].values() if e.get("method") == "regmean"
                      and (e.get("escalated") or e.get("solve") != "cholesky")})
        print(f"{alpha:>5g} {worst:>13.2e} {bad:>3}/{len(errs):<3} {dt:>7.2f}  {', '.join(esc) or '-'}", flush=True)


if __name__ == "__main__":
    main()
