"""Command line: python -m regmean_fast {info, ...}."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_info(args) -> int:
    from . import build_info

    info = build_info()
    rates = _measured_rates() if args.measure and info["extension"] else {}
    if args.json:
        if rates:
            info["measured_gflops"] = {dt: {"gram_update": round(r[0], 1), "torch_full": round(r[1], 1)}
                                       for dt, r in rates.items()}
        print(json.dumps(info, indent=2))
        return 0
    print(f"regmean_fast extension : {'built' if info['extension'] else 'missing (pure-PyTorch path)'}")
    print(f"torch                  : {info['torch']}")
    print(f"CPU kernels            : {'yes' if info['cpu_kernels'] else 'no'}")
    print(f"CUDA kernels           : {'yes' if info['cuda_kernels'] else 'no'}")
    print(f"CUDA archs             : {', '.join(info['cuda_archs']) or '-'}")
    print(f"CPU BLAS found         : {info['cpu_blas']}")
    if info["extension"]:
        print(f"CPU                    : {info['cpu_model']} ({info['cpu_features']})")
        print(f"CPU paths available    : {info['cpu_paths']} (REGMEAN_FAST_CPU_PATH picks one)")
        print(f"DARE draws (dare_*)    : {info['dare_drop_path']} (Philox4x32-10; the same masks on every path)")
    for dt, path in info["cpu_gemm_path"].items():
        rate = rates.get(dt)
        extra = (f"  {rate[0]:.0f} GFLOP/s here (torch's full X^T X: {rate[1]:.0f})" if rate else "")
        print(f"gram_update CPU path   : {dt:<9} -> {path}{extra}")
    if rates:
        print("                         (X 2048 x 1024, medians of 5; a triangle counts n d (d + 1) flops, the full "
              "product 2 n d^2;\n                          fp16: torch's fp32 product after upcasting X)")
    return 0


def _measured_rates(n: int = 2048, d: int = 1024, repeats: int = 5) -> dict:
    """{dtype name: (gram_update GFLOP/s, torch X.T @ X GFLOP/s)} on this CPU (about a second): the rate the
    chosen path reaches, beside the one torch's own GEMM offers anyone: in X's dtype for fp32 and bf16; for
    fp16 torch's fp32 GEMM after upcasting X (torch's fp16 CPU GEMM is ~30x slower where the CPU has no fp16
    arithmetic, e.g. Zen 4)."""
    import torch

    from . import ops
    from ._timing import median_time

    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        X = torch.randn(n, d).to(dtype)
        G = torch.zeros(d, d)
        ours = median_time(lambda: ops.gram_update(G, X), repeats)
        if dtype == torch.float16:
            full = median_time(lambda: (lambda X32: X32.T @ X32)(X.float()), repeats)
        else:
            full = median_time(lambda: X.T @ X, repeats)
        out[name] = (n * d * (d + 1) / ours / 1e9, 2 * n * d * d / full / 1e9)
    return out


def cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m regmean_fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what was compiled and which fast paths are live")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.add_argument("--no-measure", dest="measure", action="store_false",
                      help="skip timing the gram_update paths (about a second)")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="fine-tune real MiniLM on 4 real sentiment domains, merge with the CLI, "
                          "show what RegMean gains over averaging (minutes cold, seconds cached)")
    demo.add_argument("--alpha", type=float, default=0.9, help="RegMean alpha (default 0.9)")
    demo.add_argument("--synthetic", action="store_true", help="the synthetic one-layer merge instead (seconds)")
    demo.add_argument("--out", default=None, help="also write results.md/json/png into this folder")
    demo.set_defaults(func=cmd_demo)
    from .grams.command import register_grams

    register_grams(sub)
    from .merge.command import register_merge

    register_merge(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ._ext import cpu_path_error
    from .merge.errors import MergeError

    error = cpu_path_error()
    if error:  # checked up front: every command may reach gram_update
        print(f"regmean_fast: error: {error}", file=sys.stderr)
        return 2

    try:
        return args.func(args)
    except MergeError as e:
        print(f"regmean_fast: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
