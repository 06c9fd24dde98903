"""The full quality comparison (issue #7), on 2 CPU cores.

    python benchmarks/quality/run.py [--out benchmarks/quality/results] [--seeds 0 1] [--skip-sentiment]

1. Sentiment (regmean_fast.quality.sentiment, configuration FULL): the real all-MiniLM-L6-v2 weights
   fine-tuned on the four VADER domains (tweets, movie, amazon, NYT; deduplicated; fixed splits),
   statistics with `python -m regmean_fast grams --fisher` and merges with `python -m regmean_fast merge`
   (the real CLI): RegMean over an alpha sweep, simple average, Fisher, task arithmetic, TIES; plus the
   ensemble (averaged probabilities), multi-task training on the union and every individual model in
   and out of its domain. Fine-tuned models, statistics, merges and predictions are cached under
   ~/.cache/regmean_fast/quality, so a re-run takes seconds.
2. Digits (regmean_fast.quality.digits): the from-scratch MLP on sklearn digits, MNIST-8x8 and rotated
   MNIST-8x8 (seconds per seed; exercises the singular-Gram guard).

Writes OUT/sentiment/results.{md,json}, comparison.png and the same under OUT/digits, and prints the tables.
The demo (`python -m regmean_fast demo`) is the small configuration of the same sentiment pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from regmean_fast.quality import digits, fetch, report, sentiment  # noqa: E402


def run_digits(seeds, out, alphas=(0.9, 0.1, 0.5, 1.0)):
    import torch

    torch.set_num_threads(1)  # tiny matmuls
    rows: dict = {}
    t0 = time.perf_counter()
    for s in seeds:
        for i, a in enumerate(alphas):
            r = digits.run(seed=s, alpha=a, extra=(i == 0))
            for name, per_dom in r["rows"].items():
                if i > 0 and not name.startswith("RegMean"):
                    continue
                rows.setdefault(name, {})[str(s)] = per_dom
    res = {"domains": list(digits.DOMAINS), "seeds": list(seeds), "rows": rows,
           "settings": {"mlp": "64-256-256-10", "pretrain": "5 epochs, 1500 MNIST-8x8", "finetune": "10 epochs",
                        "split": "70/30", "alphas": list(alphas)},
           "seconds": time.perf_counter() - t0}
    gains = [(f"RegMean (alpha={alphas[0]})", "simple average"), (f"RegMean (alpha={alphas[0]})", "Fisher")]
    paths = report.write(res, out, gains, title="digits, from scratch (MLP)")
    print(f"\ndigits (from scratch, {len(seeds)} seeds, {res['seconds']:.0f} s): test accuracy (%)")
    print(report.text_table(res, gains))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--skip-sentiment", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--quick", action="store_true", help="the demo's sizes and training (400/300 examples, 3 epochs) with every method and seed")
    p.add_argument("--plusplus", type=float, nargs="*", default=[0.9],
                   help="RegMean++ alphas in the sentiment setup (default 0.9; none: leave it out)")
    a = p.parse_args(argv)
    if not a.skip_digits:
        run_digits(a.seeds, os.path.join(a.out, "digits"))
    if not a.skip_sentiment:
        cfg = dataclasses.replace(sentiment.FULL, seeds=tuple(a.seeds), plusplus_alphas=tuple(a.plusplus))
        if a.quick:
            d = sentiment.DEMO   # the demo's training and statistics (its seed-0 models are reused from the cache)
            cfg = dataclasses.replace(cfg, n_train=d.n_train, n_test=d.n_test, epochs=d.epochs, lr=d.lr,
                                      stats_examples=d.stats_examples)
        try:
            res = sentiment.run(cfg)
        except fetch.FetchError as e:
            print(f"regmean_fast: error: {e}", file=sys.stderr)
            return 2
        gains = sentiment.default_gains(cfg)
        paths = report.write(res, os.path.join(a.out, "sentiment"), gains,
                             title="all-MiniLM-L6-v2 on 4 VADER domains")
        print(f"\nsentiment ({len(cfg.seeds)} seeds, {res['seconds']:.0f} s this run): test accuracy (%)")
        print(report.text_table(res, gains))
        print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
