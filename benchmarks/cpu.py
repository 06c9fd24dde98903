"""Fast CPU ops against the pure-PyTorch way of doing the same thing, measured in the same run.

    python -m benchmarks.cpu [--quick] [--repeats N] [--json out.json]

Prints (and writes into the JSON) where it ran first: the CPU's model, the flags that decide the CPU
path (amx/avx512_bf16/avx2), cores, threads and the gram_update path per dtype.

gram_update: two baselines of the same shape, each taking turns with the fast op within every repeat:
`G.addmm_(X32.T, X32)` (the published codes' fp32 Gram; X already fp32) and torch's own full bf16
`torch.mm(Xb.T, Xb)` (oneDNN; the rate this CPU offers anyone for bf16; the triangle should take about
half its time). Each bf16 path this machine can run is timed (forced with REGMEAN_FAST_CPU_PATH). At the
collector's shapes (a few hundred rows, many Grams in turn) the full product `torch.mm(X.T, X)` in the
input dtype is the baseline; the reduction: the tensor expression sum_k f_k (alpha G_k + (1 - alpha) diag(G_k)).
The task-vector passes of ties / dare_*: dare_drop_ against torch's way (torch.rand from a CPU generator, < density,
the mask multiplied in, fp64 L1 norms before and after, a slice of 2^20 entries at a time; mergekit draws
torch.bernoulli, no faster), magnitude_drop_ (TIES's top-k) against its tensor expressions (a bincount radix
select), consensus_merge_ against its tensor expressions (ops.torch_consensus_merge_), and the
weighted sum scaled_add_ from bf16 against converting each tensor to fp32, then mul / add_.
Times are medians; the machine may be shared, so read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import regmean_fast as rf
from regmean_fast import ops

from .common import interleaved_medians, machine_info, print_machine, print_table


def forced(path: str | None, fn):
    """fn with REGMEAN_FAST_CPU_PATH=path set around each call (None: the automatic path)."""
    def run():
        old = os.environ.get("REGMEAN_FAST_CPU_PATH")
        if path:
            os.environ["REGMEAN_FAST_CPU_PATH"] = path
        else:
            os.environ.pop("REGMEAN_FAST_CPU_PATH", None)
        try:
            fn()
        finally:
            os.environ.pop("REGMEAN_FAST_CPU_PATH", None)
            if old is not None:
                os.environ["REGMEAN_FAST_CPU_PATH"] = old
    return run


def path_label(dtype: torch.dtype, path: str | None) -> str:
    auto = rf.build_info()["cpu_gemm_path"].get(str(dtype).replace("torch.", ""), "?")
    return auto if path is None else path


def bench_gram(d: int, rows: int, dtype: torch.dtype, repeats: int, path: str | None = None):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(rows, d, generator=g).to(dtype)
    X32, Xb = X.float(), X.bfloat16()
    G, G32 = torch.zeros(d, d), torch.zeros(d, d)
    out = torch.empty(d, d, dtype=torch.bfloat16)  # preallocated: no page faults timed
    t = interleaved_medians({
        "fast": forced(path, lambda: ops.gram_update(G, X)),
        "addmm": lambda: G32.addmm_(X32.T, X32),
        "bf16mm": lambda: torch.mm(Xb.T, Xb, out=out),
    }, repeats)
    flops = 2.0 * rows * d * d  # of the full product, for comparable GFLOP/s
    return {
        "op": "gram_update", "shape": f"rows={rows} d={d} {str(dtype)[6:]}", "path": path_label(dtype, path),
        "fast_s": t["fast"], "torch_s": t["addmm"], "speedup": t["addmm"] / t["fast"],
        "torch_bf16_mm_s": t["bf16mm"], "time_over_bf16_mm": t["fast"] / t["bf16mm"],
        "fast_gflops_equiv": flops / t["fast"] / 1e9, "torch_gflops": flops / t["addmm"] / 1e9,
        "torch_bf16_mm_gflops": flops / t["bf16mm"] / 1e9,
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

    t = interleaved_medians({"fast": fast, "full": full}, repeats)
    t_fast, t_full = t["fast"] / grams, t["full"] / grams
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
    t = interleaved_medians({"fast": lambda: ops.gram_reduce(inputs, factors, 0.9),
                             "base": lambda: ops.reduce_expression(grams, factors, 0.9, torch.float32)}, repeats)
    fast, base = t["fast"], t["base"]
    read_bytes = k * (d * (d + 1) // 2) * 4 + d * d * 4
    return {
        "op": "gram_reduce", "shape": f"K={k} d={d}{' packed' if packed else ''}", "path": "cpu",
        "fast_s": fast, "torch_s": base, "speedup": base / fast, "fast_GBps": read_bytes / fast / 1e9,
    }


def _in_place(op: str, shape: str, path: str, refill, fast, plain, repeats: int) -> dict:
    """A row for two in-place ops whose input must be refilled before each call: the refill is timed on its
    own, in the same turns, and taken off both."""
    t = interleaved_medians({"fast": lambda: (refill(), fast()), "plain": lambda: (refill(), plain()),
                             "refill": refill}, repeats)
    fast_s, plain_s = t["fast"] - t["refill"], t["plain"] - t["refill"]
    return {"op": op, "shape": shape, "path": path, "fast_s": fast_s, "torch_s": plain_s,
            "speedup": plain_s / fast_s}


def bench_dare_drop(n: int, repeats: int):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g)
    work = x.clone()
    key, threshold = (123, 456), 1 << 31

    def plain():  # the same contract the way torch offers: its serial CPU generator
        gen = torch.Generator().manual_seed(7)
        for a in range(0, n, 1 << 20):
            part = work[a:a + (1 << 20)]
            part.abs().sum(dtype=torch.float64)
            part.mul_(torch.rand(part.numel(), generator=gen) < 0.5)
            part.abs().sum(dtype=torch.float64)

    return _in_place("dare_drop_", f"n={n} fp32 density 0.5", rf.build_info().get("dare_drop_path", "torch"),
                     lambda: work.copy_(x), lambda: ops.dare_drop_(work, key, threshold), plain, repeats)


def bench_magnitude_drop(n: int, repeats: int):
    """TIES's top-k drop (density 0.5): the compiled radix select + drop against the same in tensor expressions
    (ops.torch_magnitude_drop_: a radix select by bincount over slices, the mask, fp64 L1 norms)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(n, generator=g)
    work = x.clone()
    return _in_place("magnitude_drop_", f"n={n} fp32 density 0.5", "cpu", lambda: work.copy_(x),
                     lambda: ops.magnitude_drop_(work, n // 2), lambda: ops.torch_magnitude_drop_(work, n // 2),
                     repeats)


def bench_consensus(n: int, k: int, repeats: int):
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(n, generator=g) for _ in range(k)]
    base = torch.randn(n, generator=g)
    out = base.clone()
    args = (deltas, [1.0, 0.5, 0.8][:k] + [1.0] * max(0, k - 3), [1.0] * k, True, 1.0)
    return _in_place("consensus_merge_", f"K={k} n={n} fp32", "cpu", lambda: out.copy_(base),
                     lambda: ops.consensus_merge_(out, *args), lambda: ops.torch_consensus_merge_(out, *args),
                     repeats)


def bench_scaled_add(n: int, k: int, repeats: int):
    """The merge's weighted sum of K bf16 tensors into fp32: scaled_add_ from the stored bf16 against torch's
    way (each tensor converted to fp32, then mul / add_ with alpha)."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, generator=g).bfloat16() for _ in range(k)]
    acc, conv = torch.empty(n), torch.empty(n)
    cs = [1.0 / k] * k

    def fast():
        for i, x in enumerate(xs):
            ops.scaled_add_(acc, x, cs[i], assign=i == 0)

    def plain():
        for i, x in enumerate(xs):
            conv.copy_(x)
            if i == 0:
                torch.mul(conv, cs[i], out=acc)
            else:
                acc.add_(conv, alpha=cs[i])

    t = interleaved_medians({"fast": fast, "plain": plain}, repeats)
    return {"op": "scaled_add_", "shape": f"K={k} n={n} bf16 -> fp32", "path": "cpu",
            "fast_s": t["fast"], "torch_s": t["plain"], "speedup": t["plain"] / t["fast"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    shapes = [(2048, 1024)] if args.quick else [(4096, 2048), (8192, 4096)]
    dr = 1024 if args.quick else 4096
    where = machine_info()
    print_machine(where)
    auto_paths = rf.build_info().get("cpu_gemm_path", {})
    available = [p for p in rf.build_info().get("cpu_paths", "").split(", ") if p]
    # The other paths this machine can run for each dtype (for bf16 the portable one too, with fewer repeats:
    # it is slow); the bf16-only paths and avx512 (fp32/fp16 only) are timed on the dtypes they take.
    takes = {torch.bfloat16: ("mkl-bf16", "avx512bf16", "blas-sgemm", "portable"),
             torch.float16: ("avx512", "blas-sgemm"), torch.float32: ("avx512", "blas-sgemm")}
    results = []
    for rows, d in shapes:
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            auto = auto_paths.get(str(dt).replace("torch.", ""))
            results.append(bench_gram(d, rows, dt, args.repeats))
            results += [bench_gram(d, rows, dt, max(1, args.repeats // 2) if p == "portable" else args.repeats, path=p)
                        for p in takes[dt] if p in available and p != auto]
    results += [
        # the shapes of statistics collection on BERT-base (benchmarks/bench_grams.py): ~755 real rows
        *(bench_gram_activations(da, 755, dt, args.repeats) for dt in (torch.bfloat16, torch.float32)
          for da in ((256,) if args.quick else (768, 3072))),
        bench_reduce(dr, 4, args.repeats),
        bench_reduce(dr, 4, args.repeats, packed=True),
        # an embedding matrix's worth of entries (32000 x 1024), then a layer's projection
        *(bench_dare_drop(n, args.repeats) for n in ((1 << 20,) if args.quick else (32000 * 1024, 1024 * 2816))),
        *(bench_magnitude_drop(n, args.repeats) for n in ((1 << 20,) if args.quick else (32000 * 1024, 1024 * 2816))),
        *(bench_consensus(n, 3, args.repeats) for n in ((1 << 20,) if args.quick else (32000 * 1024, 1024 * 2816))),
        *(bench_scaled_add(n, 3, args.repeats) for n in ((1 << 20,) if args.quick else (32000 * 1024, 1024 * 2816))),
    ]

    def bf16mm(r, key):
        return f"{r[key]:.2f}" if key in r else "-"

    print_table(
        [(r["op"], r["shape"], r["path"], f"{r['fast_s'] * 1e3:.1f}", f"{r['torch_s'] * 1e3:.1f}", f"{r['speedup']:.2f}x",
          f"{r['torch_bf16_mm_s'] * 1e3:.1f}" if "torch_bf16_mm_s" in r else "-", bf16mm(r, "time_over_bf16_mm"))
         for r in results],
        ["op", "shape", "path", "fast ms", "torch ms", "speed-up", "bf16 mm ms", "fast/bf16 mm"],
    )
    print("torch ms: fp32 G.addmm_(X.T, X) for gram_update (X already fp32), torch.mm(X.T, X) in X's dtype for the "
          "collector's shapes, the tensor expressions for gram_reduce, magnitude_drop_ and consensus_merge_, "
          "torch.rand's drop for dare_drop_, convert + mul/add_ for scaled_add_; bf16 mm: torch's full bf16 X.T @ X, "
          "same shape.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": where, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
