"""Fast CPU ops against the pure-PyTorch way of doing the same thing, measured in the same run.

    python -m benchmarks.cpu [--quick] [--json out.json]

gram_update: `G.addmm_(X.float().T, X.float())` (the published codes' fp32 upcast) is the
baseline; at the collector's shapes (a few hundred rows, many Grams in turn) the full product
`torch.mm(X.T, X)` in the input dtype is (the triangle should take about half its time); the reduction: the tensor expression sum_k f_k (alpha G_k + (1 - alpha) diag(G_k)).
Times are medians; the machine is noisy, so read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import regmean_fast as rf
from regmean_fast import ops

from .common import median_time, print_table


def bench_gram(d: int, rows: int, dtype: torch.dtype, repeats: int, path: str | None = None):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(rows, d, generator=g).to(dtype)
    G = torch.zeros(d, d)
    old = os.environ.pop("REGMEAN_FAST_CPU_GEMM", None)
    if path:
        os.environ["REGMEAN_FAST_CPU_GEMM"] = path
    try:
        fast = median_time(lambda: ops.gram_update(G, X), repeats)
        label = rf.build_info()["cpu_gemm_path"].get(str(dtype).replace("torch.", ""), "?")
    finally:
        os.environ.pop("REGMEAN_FAST_CPU_GEMM", None)
        if old is not None:
            os.environ["REGMEAN_FAST_CPU_GEMM"] = old
    base = median_time(lambda: G.addmm_(X.float().T, X.float()), repeats)
    flops = 2.0 * rows * d * d  # of the full product, for comparable GFLOP/s
    return {
        "op": "gram_update", "shape": f"d={d} rows={rows} {str(dtype)[6:]}", "path": label,
        "fast_s": fast, "torch_s": base, "speedup": base / fast,
        "fast_gflops_equiv": flops / fast / 1e9, "torch_gflops": flops / base / 1e9,
    }


def bench_gram_activations(d: int, rows: int, dtype: torch.dtype, repeats: int, grams: int = 12):
    """gram_update as the collector calls it: one call per Gram, `grams` different Grams in turn (so G
    comes from memory, not cache, as in a forward over many layers), a few hundred rows each. The
    baseline is the full product X^T X in the same dtype (torch.mm), the bound the triangle should beat."""
    g = torch.Generator().manual_seed(2)
    Xs = [torch.randn(rows, d, generator=g).to(dtype) for _ in range(grams)]
    Gs = [torch.zeros(d, d) for _ in range(grams)]
    XTs = [X.T for X in Xs]
    outs = [torch.empty(d, d, dtype=dtype) for _ in range(grams)]  # preallocated: no page faults timed

    def fast():
        for G, X in zip(Gs, Xs):
            ops.gram_update(G, X)

    def full():
        for XT, X, out in zip(XTs, Xs, outs):
            torch.mm(XT, X, out=out)

    t_fast = median_time(fast, repeats) / grams
    t_full = median_time(full, repeats) / grams
    label = rf.build_info()["cpu_gemm_path"].get(str(dtype).replace("torch.", ""), "?")
    return {
        "op": "gram_update vs mm", "shape": f"d={d} rows={rows} {str(dtype)[6:]}, {grams} Grams", "path": label,
        "fast_s": t_fast, "torch_s": t_full, "speedup": t_full / t_fast, "baseline": "torch.mm full product",
    }


def bench_reduce(d: int, k: int, repeats: int, packed: bool = False):
    g = torch.Generator().manual_seed(1)
    grams = [torch.randn(d, d, generator=g) for _ in range(k)]
    factors = [1.0 / k] * k
    inputs = [ops.pack_triu(G) for G in grams] if packed else grams
    fast = median_time(lambda: ops.gram_reduce(inputs, factors, 0.9), repeats)
    base = median_time(lambda: ops.reduce_expression(grams, factors, 0.9, torch.float32), repeats)
    read_bytes = k * (d * (d + 1) // 2) * 4 + d * d * 4
    return {
        "op": "gram_reduce", "shape": f"K={k} d={d}{' packed' if packed else ''}", "path": "cpu",
        "fast_s": fast, "torch_s": base, "speedup": base / fast, "fast_GBps": read_bytes / fast / 1e9,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    d, rows, dr = (1024, 2048, 1024) if args.quick else (4096, 8192, 4096)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {rf.build_info()['cpu_blas']}")
    results = [
        bench_gram(d, rows, torch.bfloat16, args.repeats),
        bench_gram(d, rows, torch.bfloat16, max(1, args.repeats // 2), path="portable"),
        bench_gram(d, rows, torch.float16, args.repeats),
        bench_gram(d, rows, torch.float32, args.repeats),
        # the shapes of statistics collection on BERT-base (benchmarks/bench_grams.py): ~755 real rows
        *(bench_gram_activations(da, 755, dt, args.repeats) for dt in (torch.bfloat16, torch.float32)
          for da in ((256,) if args.quick else (768, 3072))),
        bench_reduce(dr, 4, args.repeats),
        bench_reduce(dr, 4, args.repeats, packed=True),
    ]
    print_table(
        [(r["op"], r["shape"], r["path"], f"{r['fast_s'] * 1e3:.1f}", f"{r['torch_s'] * 1e3:.1f}", f"{r['speedup']:.1f}x")
         for r in results],
        ["op", "shape", "path", "fast ms", "torch ms", "speed-up"],
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
