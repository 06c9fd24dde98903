"""Timing helpers shared by the benchmark scripts: medians over repeats, after a warm-up."""

from __future__ import annotations

import statistics
import time


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def print_table(rows, headers) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def machine_info() -> dict:
    """Where a figure was measured: CPU model, the flags that pick the fast paths, cores, torch, and the
    paths regmean_fast takes here (a speed figure from one CPU family is not a general claim)."""
    import os
    import platform

    import torch

    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("unknown", "x86_64", ""):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    info = {"cpu": model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "flags": sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma"}),
            "torch": torch.__version__}
    try:
        import regmean_fast

        info["regmean_fast"] = regmean_fast.build_info()
    except Exception as e:  # a benchmark of the baseline alone still runs
        info["regmean_fast"] = f"unavailable: {e}"
    return info
