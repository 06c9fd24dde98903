"""Timing helpers shared by the benchmark scripts: medians over repeats, after a warm-up."""

from __future__ import annotations

import statistics
import time


from regmean_fast._timing import median_time  # noqa: E402,F401  (one definition, shared with `info`)


def interleaved_medians(fns: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Median time of each function, the functions taking turns within every repeat: on a shared machine
    a burst of load then slows each of them alike, and their ratios stay meaningful."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def cpu_description() -> tuple[str, list]:
    """(the CPU's model name, the flags among amx_bf16/amx_tile/avx512_bf16/avx512f/avx2/fma it has), from
    /proc/cpuinfo, importing nothing heavy (bench_merge's parent must stay small)."""
    import platform

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
    return model, sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma"})


def print_machine(m: dict) -> None:
    """One line of machine_info(): the CPU, its flags, cores and threads, the BLAS and gram_update's paths."""
    rf = m["regmean_fast"] if isinstance(m["regmean_fast"], dict) else {}
    paths = ", ".join(f"{k} -> {v}" for k, v in rf.get("cpu_gemm_path", {}).items()) or "?"
    print(f"CPU: {m['cpu']}; flags: {' '.join(m['flags']) or '-'}; {m['cpus']} cores, torch {m['torch']} with "
          f"{m['torch_threads']} threads; BLAS: {rf.get('cpu_blas', '?')}; gram_update: {paths}")


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

    import torch

    model, flags = cpu_description()
    info = {"cpu": model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "flags": flags,
            "torch": torch.__version__}
    try:
        import regmean_fast

        info["regmean_fast"] = regmean_fast.build_info()
    except Exception as e:  # a benchmark of the baseline alone still runs
        info["regmean_fast"] = f"unavailable: {e}"
    return info


# A measured side runs in a fresh process started from a small parent (a child's ru_maxrss starts from the
# high-water mark of the process it was forked from): this wrapper runs `code` as __main__ with the given
# argv and prints its own peak RSS last on stderr.
_MEASURED = """import resource, sys
code = 0
try:
    exec(compile(sys.argv.pop(1), "<measured>", "exec"), {"__name__": "__main__"})
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
print("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)
sys.exit(code)
"""


def run_measured(code: str, argv=(), env=None) -> dict:
    """Run python `code` (argv after it) in a fresh process -> {"time_s", "peak_rss_mb"}; RuntimeError with the
    end of its stderr when it fails."""
    import os
    import subprocess
    import sys

    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _MEASURED, code, *map(str, argv)], capture_output=True, text=True,
                       env=None if env is None else {**os.environ, **env})
    dt = time.perf_counter() - t0
    lines = r.stderr.strip().splitlines()
    if r.returncode != 0 or not lines or not lines[-1].startswith("peak_rss_mb"):
        raise RuntimeError(r.stderr[-3000:])
    return {"time_s": dt, "peak_rss_mb": float(lines[-1].split()[-1])}


CLI = "import runpy, sys; sys.argv[0] = 'regmean_fast'; runpy.run_module('regmean_fast', run_name='__main__')"
