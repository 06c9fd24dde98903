"""Cost of collecting Grams over a plain forward pass, and against the published codes' hook.

    python benchmarks/bench_grams.py                       # BERT-base shape, batch 8 x 128 tokens, CPU
    python benchmarks/bench_grams.py --layers 2 --batches 2  # quick look
    python benchmarks/bench_grams.py --model ~/.cache/regmean_fast/models/smollm2-135m-instruct --dtype bf16
        # a real causal LM folder (benchmarks/llm_models.py makes them), random tokens of its vocabulary

Three runs on the same random-weight model and the same batches (with padding):
  plain      model(**batch) under no_grad
  ours       regmean_fast.grams.GramCollector: one Gram per distinct input (q/k/v share), padding rows
             dropped, fp32 upper-triangle update through regmean_fast.ops.gram_update
  published  bloomberg/dataless-model-merging's hook: x.view(-1, d), fp32 upcast, full x^T x, running mean,
             one Gram per module, padding kept
A causal LM's statistics need no logits (collect.logits_free_forward): for those a fourth run, the plain
forward without them (logits_to_keep=1), is the floor the statistics add to.
The runs alternate batch by batch. Prints the median seconds per batch and the medians of the
per-batch ratios ours/plain (goal <= 1.25 on CPU for BERT-base at seq 128) and published/plain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def published_hooks(model):
    """The reference hook (regmean-reference.md 2.1), for comparison."""
    from transformers.pytorch_utils import Conv1D

    grams, ns, handles = {}, {}, []

    def make(name):
        def hook(mod, inp, out):
            x = inp[0].detach()
            x = x.view(-1, x.size(-1)).float()
            rows = x.size(0)
            xtx = x.T @ x
            if name not in grams:
                grams[name] = xtx / rows
                ns[name] = rows
            else:
                grams[name] = (grams[name] * ns[name] + xtx) / (ns[name] + rows)
                ns[name] += rows

        return hook

    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)):
            handles.append(m.register_forward_hook(make(n)))
    return handles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a causal LM folder instead of the random BERT (--layers etc. ignored)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", type=int, default=3, help="timed batches per variant (after one warm-up)")
    ap.add_argument("--pad-frac", type=float, default=0.25, help="mean fraction of padding per example")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="forward dtype (bf16: the activations reach gram_update as bf16, the AMX path on x86)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    from regmean_fast import build_info
    from regmean_fast.grams.collect import GramCollector

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(args.model), dtype=dtype).to(args.device).eval()
        cfg = model.config
        described = (f"{cfg.model_type} {os.path.basename(os.path.normpath(args.model))}, {cfg.num_hidden_layers} "
                     f"layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    else:
        cfg = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         intermediate_size=4 * args.hidden, max_position_embeddings=max(512, args.seq))
        model = BertModel(cfg).to(device=args.device, dtype=dtype).eval()
        described = f"BERT {args.layers} layers, hidden {args.hidden}"
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches + 1):
        ids = torch.randint(1000, cfg.vocab_size, (args.batch, args.seq), generator=g)
        lens = args.seq - (torch.rand(args.batch, generator=g) * 2 * args.pad_frac * args.seq).long().clamp(
            0, args.seq - 1)
        att = (torch.arange(args.seq)[None, :] < lens[:, None]).long()
        batches.append({"input_ids": ids.to(args.device), "attention_mask": att.to(args.device)})

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    col = GramCollector(model)

    def plain(b):
        model(**b)

    def ours(b):
        with col:
            model(**b, **col.forward_kwargs)
        col.finish()

    def plain_nologits(b):
        model(**b, **col.forward_kwargs)

    def published(b):
        handles = published_hooks(model)
        model(**b)
        for h in handles:
            h.remove()

    # The three runs alternate batch by batch, and the ratios are taken per batch before the median:
    # on a shared machine the load swings over seconds, which a plain-then-ours order would read as
    # overhead (or hide). An untimed plain forward first, so that the timed one does not start in the
    # caches the published hook left (that made it ~15% slower).
    times = {"plain": [], "ours": [], "published": []}
    runs = [("settle", plain), ("plain", plain), ("ours", ours), ("published", published)]
    if col.forward_kwargs:
        times["no logits"] = []
        runs.append(("no logits", plain_nologits))
    with torch.no_grad():
        for i, b in enumerate(batches):
            for name, fn in runs:
                sync()
                t = time.perf_counter()
                fn(b)
                sync()
                if i and name in times:  # the first batch warms up
                    times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    r_ours = statistics.median(o / p for o, p in zip(times["ours"], times["plain"]))
    r_pub = statistics.median(o / p for o, p in zip(times["published"], times["plain"]))
    info = build_info()
    print(f"model: {described}; batch {args.batch} x {args.seq} tokens "
          f"({int(sum(int(b['attention_mask'].sum()) for b in batches[1:]) / args.batches)} real per batch); "
          f"device {args.device}; CPU {info.get('cpu_model', '?')} ({info.get('cpu_features', '?')}), "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads; "
          f"forward {args.dtype}; gram_update CPU path "
          f"{info.get('cpu_gemm_path', {}).get({'fp32': 'float32', 'bf16': 'bfloat16'}[args.dtype], '?')}")
    print(f"plain forward      : {med['plain']:.4f} s/batch")
    print(f"ours (grams)       : {med['ours']:.4f} s/batch")
    print(f"published hook     : {med['published']:.4f} s/batch")
    print(f"ratio ours/plain      = {r_ours:.3f}   (median of the per-batch ratios)")
    print(f"ratio published/plain = {r_pub:.3f}")
    if "no logits" in times:
        r_nl = statistics.median(o / p for o, p in zip(times["ours"], times["no logits"]))
        print(f"plain forward without logits: {statistics.median(times['no logits']):.4f} s/batch; "
              f"ratio ours/that = {r_nl:.3f} (what the statistics themselves add)")
    if r_ours > 1:
        print(f"speed-up of the statistics over the published hook = {(r_pub - 1) / (r_ours - 1):.2f}x")
    else:
        print("the statistics cost less than the plain forward (its logits are skipped)")


if __name__ == "__main__":
    main()
