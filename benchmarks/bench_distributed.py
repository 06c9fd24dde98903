"""Strong scaling of `grams` and `merge` with 1 and 2 gloo processes on this machine's CPU, and the
measured per-group RegMean cost used for the Llama-3-70B estimate in docs/distributed.md.

    python benchmarks/bench_distributed.py [--hidden 384 --layers 4 --examples 96 --json out.json]

Wall times are whole commands (`python -m regmean_fast ...`, interpreter start and imports included),
ranks started with torchrun's variables on 127.0.0.1, OMP_NUM_THREADS=1 per rank (what torchrun sets).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv, n):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    port = str(_port())
    t0 = time.perf_counter()
    procs = []
    for r in range(n):
        e = dict(env)
        if n > 1:
            e.update(WORLD_SIZE=str(n), RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "regmean_fast", *map(str, argv)], env=e,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{argv[0]} with {n} process(es) failed:\n{err[-2000:]}")
    return time.perf_counter() - t0


def group_cost_fit(sizes=((512, 1536), (1024, 1024), (1024, 3072), (2048, 2048))):
    """Seconds for one RegMean group (2 models) of d_in x d_out on this CPU, through merge_state_dicts,
    and the fitted seconds per unit of d_in^3 + d_in^2 d_out."""
    from regmean_fast.merge import merge_state_dicts

    rows, units = [], []
    torch.set_num_threads(1)
    for d, o in sizes:
        g = torch.Generator().manual_seed(d + o)
        sds = [{"l.weight": torch.randn(o, d, generator=g)} for _ in range(2)]
        grams = []
        for _ in range(2):
            X = torch.randn(2 * d, d, generator=g)
            grams.append({"l": X.T @ X})
        merge_state_dicts(sds, grams)  # warm-up
        t0 = time.perf_counter()
        merge_state_dicts(sds, grams)
        dt = time.perf_counter() - t0
        u = d ** 3 + d * d * o
        rows.append({"d_in": d, "d_out": o, "seconds": round(dt, 4), "s_per_unit": dt / u})
        units.append(dt / u)
    return rows, sorted(units)[len(units) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import hf_tiny

    tmp = tempfile.mkdtemp(prefix="bench_dist_")
    over = dict(hidden_size=a.hidden, intermediate_size=int(a.hidden * 8 / 3) // 8 * 8, num_hidden_layers=a.layers,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    models = [hf_tiny.save_tiny(os.path.join(tmp, f"m{i}"), "llama", seed=i, **over) for i in range(2)]
    data = os.path.join(tmp, "data.jsonl")
    with open(data, "w") as f:
        for t in hf_tiny.random_texts(a.examples, seed=1, min_words=40, max_words=120):
            f.write(json.dumps({"text": t}) + "\n")
    res = {"hidden": a.hidden, "layers": a.layers, "examples": a.examples, "cpu_cores": os.cpu_count()}
    grams_of = {}
    for n in (1, 2):
        outs = []
        t = 0.0
        for i, m in enumerate(models):
            o = os.path.join(tmp, f"g{i}-{n}.safetensors")
            t += run(["grams", m, "--data", data, "--batch-size", "4", "--no-progress", "--out", o], n)
            outs.append(o)
        res[f"grams_s_{n}"] = round(t / len(models), 2)
        grams_of[n] = outs
    for n in (1, 2):  # both merges read the same (one-process) Gram files: the outputs must be bit-identical
        res[f"merge_s_{n}"] = round(run(["merge", "--models", *models, "--grams", *grams_of[1], "--shard-size",
                                         "2MB", "--out", os.path.join(tmp, f"merged-{n}")], n), 2)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import regmean_fast.grams.command, transformers, transformers.models.llama"],
                   check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    res["startup_s"] = round(time.perf_counter() - t0, 2)  # interpreter + imports, paid by every command
    res["grams_speedup_2"] = round(res["grams_s_1"] / res["grams_s_2"], 2)
    res["merge_speedup_2"] = round(res["merge_s_1"] / res["merge_s_2"], 2)
    same = all(open(os.path.join(tmp, "merged-1", f), "rb").read() == open(os.path.join(tmp, "merged-2", f), "rb").read()
               for f in os.listdir(os.path.join(tmp, "merged-1")) if f.endswith(".safetensors"))
    res["merge_bit_identical"] = same
    rows, unit = group_cost_fit()
    res["group_cost_rows"] = rows
    res["cpu_s_per_unit_1thread"] = unit
    # Llama-3-70B-shaped: hidden 8192, intermediate 28672, 80 layers, 8 KV heads of 128 (k, v: 1024 outputs)
    per_layer = [(8192, 8192 + 2 * 1024), (8192, 8192), (8192, 2 * 28672), (28672, 8192)]
    units70 = 80 * sum(d ** 3 + d * d * o for d, o in per_layer)
    res["llama70b_units"] = units70
    res["llama70b_merge_cpu_1thread_h"] = round(units70 * unit / 3600, 1)
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
