"""GPU benchmarks of the fast ops against pure PyTorch, in one run (for benchmarks/gpu_check.sh).

    python -m benchmarks.gpu OUT_DIR [--quick]

Prints a short table (ms, TFLOP/s or GB/s, ratios) and writes OUT_DIR/gpu_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import regmean_fast as rf
import regmean_fast._ext  # noqa: F401  (rf._ext.HAS_CUDA_REDUCE)
from regmean_fast import ops
from regmean_fast.solve import robust_spd_solve

from .common import print_table


def cuda_time(fn, repeats: int = 10) -> float:
    """Median seconds per call, timed with CUDA events after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def with_env(name: str, value: str, fn):
    """fn run with one environment variable set (the CUDA binding reads it on every call)."""
    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return run


def bench_gram(d: int, rows: int) -> list[dict]:
    X = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    G = torch.zeros(d, d, device="cuda")
    flops = 2.0 * rows * d * d
    out = [("regmean_fast gram_update (triangle)", lambda: ops.gram_update(G, X)),
           ("regmean_fast gram_update (fp32-FMA fallback kernel)", with_env("REGMEAN_FAST_CUDA_GEMM", "fma",
                                                                          lambda: ops.gram_update(G, X)))]
    try:
        torch.addmm(G, X.T, X, out_dtype=torch.float32)
        out.append(("torch.addmm bf16->fp32 (full)", lambda: torch.addmm(G, X.T, X, out_dtype=torch.float32)))
    except (TypeError, RuntimeError) as e:
        print(f"torch.addmm(out_dtype=...) unavailable: {e}")
    out.append(("fp32 upcast addmm_ (published codes)", lambda: G.addmm_(X.float().T, X.float())))
    # Accuracy against fp64 on the same data; the lower triangle is poisoned and must stay so.
    G.copy_(torch.tril(torch.full_like(G, float("nan")), -1))
    ops.gram_update(G, X)
    ref = torch.triu(X.double().T @ X.double())
    rel = float((torch.triu(G.nan_to_num()).double() - ref).abs().max() / ref.abs().max())
    if not bool(torch.tril(G, -1).isnan().sum() == d * (d - 1) // 2):
        rel = float("inf")  # the kernel wrote below the diagonal
    res = []
    for name, fn in out:
        t = cuda_time(fn)
        res.append({"op": name, "shape": f"d={d} rows={rows} bf16", "ms": t * 1e3,
                    "TFLOPs_equiv": flops / t / 1e12})
    base = {r["op"]: r["ms"] for r in res}
    for r in res:
        r["speedup_vs_this"] = base[res[0]["op"]] / r["ms"]
        r["rel_err_fp64"] = rel if r is res[0] else None
    return res


def bench_reduce(d: int, k: int) -> list[dict]:
    grams = [torch.randn(d, d, device="cuda") for _ in range(k)]
    f = [1.0 / k] * k
    copy_src = torch.empty(k * d * d, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    t_copy = cuda_time(lambda: copy_dst.copy_(copy_src))
    bw = 2 * copy_src.numel() * 4 / t_copy
    t_fast = cuda_time(lambda: ops.gram_reduce(grams, f, 0.9))
    packed = [ops.pack_triu(g) for g in grams]
    t_packed = cuda_time(lambda: ops.gram_reduce(packed, f, 0.9))
    full_ref = ops.reduce_expression([g.double() for g in grams], f, 0.9, torch.float64)
    got = ops.gram_reduce(grams, f, 0.9)
    rel = float((torch.triu(got).double() - torch.triu(full_ref)).abs().max() / full_ref.abs().max())
    t_expr = cuda_time(lambda: ops.reduce_expression(grams, f, 0.9, torch.float32))
    moved = (k * d * d + d * d) * 4
    return [
        {"op": "device copy (bandwidth ceiling)", "shape": f"{k * d * d * 4 / 2**20:.0f} MiB", "ms": t_copy * 1e3, "GBps": bw / 1e9},
        {"op": f"regmean_fast gram_reduce ({'CUDA kernel' if rf._ext.HAS_CUDA_REDUCE else 'torch fallback'})",
         "shape": f"K={k} d={d}", "ms": t_fast * 1e3, "GBps": (k * d * d / 2 + d * d) * 4 / t_fast / 1e9,
         "fraction_of_copy_bw": (k * d * d / 2 + d * d) * 4 / t_fast / bw, "rel_err_fp64": rel},
        {"op": "regmean_fast gram_reduce (packed input)", "shape": f"K={k} d={d}", "ms": t_packed * 1e3,
         "GBps": (k * d * d / 2 + d * d) * 4 / t_packed / 1e9},
        {"op": "tensor expression", "shape": f"K={k} d={d}", "ms": t_expr * 1e3, "GBps": moved / t_expr / 1e9},
    ]


def bench_solve(n: int, nrhs: int) -> list[dict]:
    g = torch.randn(n, n, device="cuda")
    A = g @ g.T + n * torch.eye(n, device="cuda")
    B = torch.randn(n, nrhs, device="cuda")
    res = []
    ref = torch.linalg.solve(A.double(), B.double())

    def torch_chol(A=A, B=B):
        L, _ = torch.linalg.cholesky_ex(A)
        return torch.cholesky_solve(B, L)

    for name, fn in [("ops.spd_solve (cuSOLVER Xpotrf + Xpotrs, fp32)", lambda: ops.spd_solve(A, B)[0]),
                     ("torch cholesky_ex + cholesky_solve (fp32)", torch_chol)]:
        X = fn()
        rel = float((X.double() - ref).abs().max() / ref.abs().max())
        res.append({"op": name, "shape": f"n={n} nrhs={nrhs}", "ms": cuda_time(fn, 5) * 1e3, "rel_err_fp64": rel})
    A64, B64 = A.double(), B.double()
    res.append({"op": "ops.spd_solve (fp64)", "shape": f"n={n} nrhs={nrhs}",
                "ms": cuda_time(lambda: ops.spd_solve(A64, B64), 3) * 1e3})
    res.append({"op": "torch cholesky_ex + cholesky_solve (fp64)", "shape": f"n={n} nrhs={nrhs}",
                "ms": cuda_time(lambda: torch_chol(A64, B64), 3) * 1e3})
    for name, fn in [
        ("robust_spd_solve (fp32, the merge path)", lambda: robust_spd_solve(A, B)),
        ("torch.inverse(A) @ B (published codes)", lambda: torch.inverse(A) @ B),
        ("torch.linalg.solve (LU)", lambda: torch.linalg.solve(A, B)),
    ]:
        res.append({"op": name, "shape": f"n={n} nrhs={nrhs}", "ms": cuda_time(fn, 5) * 1e3})
    return res


def bench_group(d: int, d_out: int, k: int) -> list[dict]:
    """One RegMean group on the GPU (K models, bf16 weights [d_out, d], fp32 Grams): ours (fused
    reduction, exact bf16x3 right-hand side through cublasGemmEx, cuSOLVER Cholesky) against the
    pure-PyTorch path of the published codes (fp32 upcast, G~ W^T in fp32, torch.linalg.solve)."""
    from regmean_fast.merge.methods.regmean import GroupInputs, RegMean

    g = torch.Generator(device="cuda").manual_seed(0)
    Ws = [(torch.randn(d_out, d, device="cuda", generator=g) * 0.02).bfloat16() for _ in range(k)]
    grams = []
    for _ in range(k):
        X = torch.randn(2 * d, d, device="cuda", generator=g)
        grams.append(X.T @ X)
    alpha, counts = 0.9, [4096] * k
    method = RegMean()
    params = method.check_params({"alpha": alpha})
    inputs = GroupInputs(members=["w"], conv1d=[False], k=k, load_weight=lambda i, m: Ws[i],
                         load_gram=lambda i: grams[i], count=lambda i: counts[i], coeffs=[1.0 / k] * k)

    def ours():
        return method.merge_group(inputs, params, torch.float32)[0][0]

    def torch_path():
        gt = [(G / n) * alpha + (1 - alpha) * torch.diag(torch.diagonal(G / n)) for G, n in zip(grams, counts)]
        sum_g = sum(gt)
        sum_gw = sum(G @ W.float().T for G, W in zip(gt, Ws))
        return torch.linalg.solve(sum_g, sum_gw).T

    gt64 = [(G.double() / n) * alpha + (1 - alpha) * torch.diag(torch.diagonal(G.double() / n))
            for G, n in zip(grams, counts)]
    ref64 = torch.linalg.solve(sum(gt64), sum(G @ W.double().T for G, W in zip(gt64, Ws))).T
    del gt64
    res = []
    for name, fn in [("merge one group: regmean_fast (bf16x3 + cuSOLVER)", ours),
                     ("merge one group: pure PyTorch fp32 + linalg.solve", torch_path)]:
        out = fn()
        rel = float((out.double() - ref64).abs().max() / ref64.abs().max())
        res.append({"op": name, "shape": f"K={k} d={d} d_out={d_out}", "ms": cuda_time(fn, 3) * 1e3,
                    "rel_err_fp64": rel})
    res[0]["speedup_vs_this"] = 1.0
    res[1]["speedup_vs_this"] = res[0]["ms"] / res[1]["ms"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device")
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    info = rf.build_info()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  cuda kernels: {info['cuda_kernels']}")
    results = []
    sizes = [(1024, 4096)] if args.quick else [(4096, 16384), (8192, 16384)]
    errors = []

    def guarded(fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # one failing benchmark must not lose the others' results
            errors.append(f"{fn.__name__}{a}: {type(e).__name__}: {e}")
            print(f"FAILED {fn.__name__}{a}: {e}")
            return []

    for d, rows in sizes:
        results += guarded(bench_gram, d, rows)
    results += guarded(bench_reduce, 2048 if args.quick else 4096, 4)
    results += guarded(bench_solve, 1024 if args.quick else 4096, 1024 if args.quick else 4096 * 3)
    # Llama-3-8B shapes: q/k/v (4096 -> 4096 + 1024 + 1024) and down_proj (14336 -> 4096), 3 models.
    for d, d_out in ([(1024, 1536)] if args.quick else [(4096, 6144), (14336, 4096)]):
        results += guarded(bench_group, d, d_out, 3)
    print_table(
        [(r["op"], r["shape"], f"{r['ms']:.3f}",
          f"{r['TFLOPs_equiv']:.1f} TF" if "TFLOPs_equiv" in r else (f"{r['GBps']:.0f} GB/s" if "GBps" in r else ""),
          f"{r['speedup_vs_this']:.2f}" if "speedup_vs_this" in r else "",
          f"{r['rel_err_fp64']:.1e}" if r.get("rel_err_fp64") is not None else "")
         for r in results],
        ["op", "shape", "ms", "rate", "ours/this", "rel err"],
    )
    with open(os.path.join(args.out_dir, "gpu_bench.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "build": info,
                   "results": results, "errors": errors}, f, indent=2)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
