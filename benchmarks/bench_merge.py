"""End-to-end merge benchmark on synthetic Llama-shaped models with random SPD Grams.

    python benchmarks/bench_merge.py layers  [--hidden 512]  # peak RSS of regmean_fast for 2, 4, 8 layers
    python benchmarks/bench_merge.py layers --hidden 4096 --intermediate 14336 --kv-heads 8 --vocab 128256 \
        --layer-counts 2 4 --gram-rank 1024     # Llama-3-8B shapes (8 GQA heads); low-rank + diagonal Grams
    python benchmarks/bench_merge.py compare [--hidden 1024 --layers 4 --models 3]
        # time and peak RSS: regmean_fast vs a FusionBench-style pure-PyTorch merge (every state dict
        # and every Gram loaded, torch.inverse per layer), each side in its own subprocess, same run
    python benchmarks/bench_merge.py compare --mergekit ...  # also mergekit's linear merge against ours, same folders

Each measured merge runs in a fresh Python process and reports its own peak RSS
(resource.getrusage(RUSAGE_SELF).ru_maxrss) and its wall time after imports.
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

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def llama_names(layers: int):
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names + ["model.norm.weight", "lm_head.weight"]


def make_inputs(root: str, n_models: int, hidden: int, inter: int, layers: int, vocab: int, kv_heads: int = 0,
                gram_rank: int = 0, seed: int = 0, with_grams: bool = True):
    """n_models synthetic Llama folders (bf16) and one Gram file per model; returns (paths, grams: [] without
    with_grams).
    kv_heads: grouped-query k/v (0: as many as the query heads). gram_rank: Grams A A^T + dim I with A
    [dim, gram_rank] (0: a square A, as before; a 14336-wide square A costs 6 TFLOP to square)."""
    heads = hidden // 64
    kv_dim = (kv_heads or heads) * 64
    import transformers as tf
    from safetensors.torch import save_file

    from regmean_fast.grams.fileformat import save_grams

    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=vocab,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"])
    g = torch.Generator().manual_seed(seed)

    def shape(n):
        if n.endswith("norm.weight"):
            return (hidden,)
        if "embed" in n or "lm_head" in n:
            return (vocab, hidden)
        if "down_proj" in n:
            return (hidden, inter)
        if "gate" in n or "up_proj" in n:
            return (inter, hidden)
        return (kv_dim, hidden) if "k_proj" in n or "v_proj" in n else (hidden, hidden)

    def base(i, n):  # the shared pre-trained tensor, regenerated per model: one fp32 tensor in memory at a time
        if n.endswith("norm.weight"):
            return torch.ones(hidden)
        return torch.randn(shape(n), generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) * 0.02

    names = llama_names(layers)
    paths, grams = [], []
    for m in range(n_models):
        d = os.path.join(root, f"model{m}")
        os.makedirs(d)
        cfg.save_pretrained(d)
        sd = {n: (base(i, n) + 0.002 * torch.randn(shape(n), generator=g)).to(torch.bfloat16)
              for i, n in enumerate(names)}
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        del sd
        paths.append(d)
        if not with_grams:
            continue
        gr, counts, mm = {}, {}, {}
        for i in range(layers):
            p = f"model.layers.{i}."
            for key, dim, mods in ((p + "attn_in", hidden, [p + f"self_attn.{x}_proj" for x in "qkv"]),
                                   (p + "o_in", hidden, [p + "self_attn.o_proj"]),
                                   (p + "mlp_in", hidden, [p + "mlp.gate_proj", p + "mlp.up_proj"]),
                                   (p + "down_in", inter, [p + "mlp.down_proj"])):
                A = torch.randn(dim, gram_rank or dim, generator=g)
                G = A @ A.T
                G.diagonal().add_(dim)
                gr[key], counts[key] = G, 4096 + 17 * m
                for mod in mods:
                    mm[mod] = key
        fp = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "weights": {mod: list(shape(mod + ".weight")) for mod in mm}}
        gp = os.path.join(root, f"grams{m}.safetensors")
        save_grams(gp, gr, counts, mm, fp, {"synthetic": True})
        del gr
        grams.append(gp)
    return paths, grams


# -- the two measured sides (each runs in its own process) ------------------------------------------
def run_ours(spec: dict) -> dict:
    import regmean_fast

    t0 = time.perf_counter()
    regmean_fast.merge({"models": [{"model": p, "grams": g} for p, g in zip(spec["models"], spec["grams"])],
                        "parameters": {"alpha": spec["alpha"]}, "device": spec.get("device", "cpu")},
                       out=spec["out"])
    return {"time_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def run_fusionbench_style(spec: dict) -> dict:
    """Everything in memory, the way FusionBench's RegMeanAlgorithm works: all state dicts (fp32),
    all Grams per module (q/k/v each their own copy), torch.inverse per layer, merged state dict saved."""
    from safetensors.torch import load_file, save_file

    from regmean_fast.grams.fileformat import load_grams

    t0 = time.perf_counter()
    alpha = spec["alpha"]
    sds = [{n: t.float() for n, t in load_file(os.path.join(p, "model.safetensors")).items()} for p in spec["models"]]
    regmean_weights = []
    for gp in spec["grams"]:
        gs = load_grams(gp)
        w = {}
        for mod in gs.modules():
            G = gs.gram(mod) / gs.count(mod)
            G = G * alpha + (1 - alpha) * torch.diag(torch.diagonal(G))  # reduce_non_diagonal_elements
            w[mod] = G
        regmean_weights.append(w)
    k = len(sds)
    merged = {}
    for name in sds[0]:
        mod = name[: -len(".weight")]
        if name.endswith(".weight") and mod in regmean_weights[0]:
            sum_g = sum(rw[mod] for rw in regmean_weights)
            sum_gw = sum(rw[mod] @ sd[name].T for rw, sd in zip(regmean_weights, sds))
            merged[name] = (torch.inverse(sum_g) @ sum_gw).T.contiguous()
        else:
            merged[name] = sum(sd[name] for sd in sds) / k
    os.makedirs(spec["out"], exist_ok=True)
    save_file({n: t.to(torch.bfloat16) for n, t in merged.items()}, os.path.join(spec["out"], "model.safetensors"),
              metadata={"format": "pt"})
    return {"time_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def measure(side: str, spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "_child", side, json.dumps(spec)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def generate(root, n_models, hidden, inter, layers, vocab, kv_heads=0, gram_rank=0):
    """make_inputs in a subprocess: the parent stays small, so the children's peak RSS is their own
    (Linux keeps the RSS high-water mark of the forked parent across exec)."""
    r = subprocess.run([sys.executable, __file__, "_gen", root, *map(str, (n_models, hidden, inter, layers, vocab,
                                                                           kv_heads, gram_rank))],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def max_diff(a: str, b: str) -> float:
    from safetensors.torch import load_file

    ta = {}
    for f in os.listdir(a):
        if f.endswith(".safetensors"):
            ta.update(load_file(os.path.join(a, f)))
    tb = load_file(os.path.join(b, "model.safetensors"))
    return max(float((ta[n].float() - tb[n].float()).abs().max() / tb[n].float().abs().max().clamp(min=1e-12))
               for n in tb)


def compare_linear_with_mergekit(root: str, paths: list) -> None:
    """mergekit's linear merge and ours (`average`) on the same folders, each in a fresh process, imports
    included (bench_mergekit.py does more methods and repeats)."""
    import yaml
    from bench_mergekit import MERGEKIT
    from common import CLI, run_measured

    cfg = os.path.join(root, "linear.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump({"merge_method": "linear", "dtype": "bfloat16",
                        "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths]}, f)
    mk = run_measured(MERGEKIT, [cfg, os.path.join(root, "out_mk")])
    ours = run_measured(CLI, ["merge", cfg, "--out", os.path.join(root, "out_linear")])
    print(f"{'mergekit linear':>22} {mk['time_s']:>8.2f} {mk['peak_rss_mb']:>12.0f}")
    print(f"{'regmean_fast linear':>22} {ours['time_s']:>8.2f} {ours['peak_rss_mb']:>12.0f}")
    print(f"linear: speed-up {mk['time_s'] / ours['time_s']:.2f}x, peak RSS ratio "
          f"{ours['peak_rss_mb'] / mk['peak_rss_mb']:.2f} (ours / mergekit)")


def baseline_rss_mb() -> float:
    r = subprocess.run([sys.executable, "-c", "import resource, regmean_fast, safetensors.torch;"
                        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"], capture_output=True,
                       text=True)
    return float(r.stdout.strip())


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_gen":
        paths, grams = make_inputs(sys.argv[2], *[int(x) for x in sys.argv[3:10]],
                                   with_grams=sys.argv[10:11] != ["nograms"])
        print(json.dumps([paths, grams]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        side, spec = sys.argv[2], json.loads(sys.argv[3])
        torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
        res = run_ours(spec) if side == "ours" else run_fusionbench_style(spec)
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("layers", "compare"))
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--kv-heads", type=int, default=0, help="grouped-query k/v heads (default: as many as queries)")
    ap.add_argument("--gram-rank", type=int, default=0,
                    help="Grams A A^T + dim I with A [dim, R] (default 0: square A)")
    ap.add_argument("--layer-counts", type=int, nargs="+", default=[2, 4, 8], help="layers mode (default: 2 4 8)")
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None, help="where the synthetic inputs go (default: a temp folder)")
    ap.add_argument("--mergekit", action="store_true",
                    help="compare: also mergekit's linear merge against ours on the same folders (needs mergekit "
                         "importable, e.g. PYTHONPATH=<a folder with mergekit 0.1.5>)")
    args = ap.parse_args()
    hidden = args.hidden or (512 if args.mode == "layers" else 1024)
    inter = args.intermediate or int(hidden * 2.75)
    root = tempfile.mkdtemp(prefix="bench_merge_", dir=args.workdir)
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from common import cpu_description

        model, flags = cpu_description()
        print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({model}; "
              f"{' '.join(flags)}); interpreter + imports alone: {baseline_rss_mb():.0f} MB RSS")
        if args.mode == "layers":
            print(f"# regmean_fast merge of {args.models} synthetic Llama models, hidden {hidden}, "
                  f"intermediate {inter}, vocab {args.vocab}, bf16 weights, fp32 Grams")
            print(f"{'layers':>6} {'model MB':>9} {'grams MB':>9} {'time s':>8} {'peak RSS MB':>12}")
            for L in args.layer_counts:
                d = os.path.join(root, f"L{L}")
                os.makedirs(d)
                paths, grams = generate(d, args.models, hidden, inter, L, args.vocab, args.kv_heads, args.gram_rank)
                spec = {"models": paths, "grams": grams, "alpha": args.alpha, "out": os.path.join(d, "out"),
                        "device": args.device}
                r = measure("ours", spec)
                msz = os.path.getsize(os.path.join(paths[0], "model.safetensors")) / 2**20
                gsz = os.path.getsize(grams[0]) / 2**20
                print(f"{L:>6} {msz:>9.0f} {gsz:>9.0f} {r['time_s']:>8.2f} {r['peak_rss_mb']:>12.0f}", flush=True)
                shutil.rmtree(d)
        else:
            print(f"# {args.models} synthetic Llama models, hidden {hidden}, intermediate {inter}, {args.layers} "
                  f"layers, vocab {args.vocab}, bf16 weights, fp32 random SPD Grams, alpha {args.alpha}")
            paths, grams = generate(root, args.models, hidden, inter, args.layers, args.vocab, args.kv_heads,
                                    args.gram_rank)
            spec = {"models": paths, "grams": grams, "alpha": args.alpha, "device": args.device}
            fb = measure("fusionbench", dict(spec, out=os.path.join(root, "out_fb")))
            ours = measure("ours", dict(spec, out=os.path.join(root, "out_ours")))
            diff = max_diff(os.path.join(root, "out_ours"), os.path.join(root, "out_fb"))
            print(f"{'':>22} {'time s':>8} {'peak RSS MB':>12}")
            print(f"{'FusionBench-style':>22} {fb['time_s']:>8.2f} {fb['peak_rss_mb']:>12.0f}")
            print(f"{'regmean_fast':>22} {ours['time_s']:>8.2f} {ours['peak_rss_mb']:>12.0f}")
            print(f"speed-up {fb['time_s'] / ours['time_s']:.2f}x, peak RSS ratio "
                  f"{ours['peak_rss_mb'] / fb['peak_rss_mb']:.2f} (ours / FusionBench-style); "
                  f"max relative difference of the merged tensors {diff:.2e}")
            if args.mergekit:
                compare_linear_with_mergekit(root, paths)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
