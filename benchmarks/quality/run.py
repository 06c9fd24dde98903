"""The full quality comparison (issue #7), on 2 CPU cores.

    python benchmarks/quality/run.py [--out benchmarks/quality/results] [--seeds 0 1] [--skip-sentiment]
        [--quick] [--alphas-only] [--plusplus ALPHA ...]

1. Sentiment (regmean_fast.quality.sentiment, configuration FULL): the real all-MiniLM-L6-v2 weights
   fine-tuned on the four VADER domains (tweets, movie, amazon, NYT; deduplicated; fixed splits),
   statistics with `python -m regmean_fast grams --fisher` and merges with `python -m regmean_fast merge`
   (the real CLI): RegMean and RegMean++ over an alpha sweep (each one's alpha picked on a validation split of
   300 examples per domain, after the training ones), simple average, Fisher, task arithmetic, TIES; plus the
   ensemble (averaged probabilities), multi-task training on the union and every individual model in
   and out of its domain. Fine-tuned models, statistics, merges and predictions are cached under
   ~/.cache/regmean_fast/quality, so a re-run takes seconds.
2. Digits (regmean_fast.quality.digits): the from-scratch MLP on sklearn digits, MNIST-8x8 and rotated
   MNIST-8x8 (seconds per seed; exercises the singular-Gram guard); RegMean and RegMean++ over an alpha sweep,
   each one's alpha picked on the validation split (OUT/digits/validation/).

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


ALPHAS = (0.1, 0.5, 0.7, 0.9, 0.95, 1.0)  # the sweep, for RegMean and RegMean++ (0.9: the documented default)
HEADLINE = 0.9
N_VAL = 300  # the sentiment setup's validation examples per domain


def pick_alpha(validation: dict, method: str, alphas) -> float:
    """The alpha of `method` ("RegMean" or "RegMean++") with the best validation accuracy, mean over seeds and
    domains (ties: the first in `alphas`); validation: {row: {seed: {domain: acc}}}."""
    def score(a):
        per_seed = validation[f"{method} (alpha={a})"].values()
        return sum(sum(v.values()) / len(v) for v in per_seed) / len(per_seed)

    return max(alphas, key=lambda a: (score(a), -alphas.index(a)))


def write_with_validation(res: dict, out: str, alphas: dict, gains: list, title: str) -> dict:
    """The test table (OUT/results.*) with each method's alpha picked on the validation split (res["validation"],
    also written: OUT/validation/results.*); alphas: {method: its swept alphas}. Prints both tables."""
    validation = res.pop("validation")
    picked = {m: pick_alpha(validation, m, list(a)) for m, a in alphas.items() if a}
    res["settings"] = dict(res.get("settings") or {}, picked_on_validation=picked)
    pair = []
    if len(picked) == 2:
        pair = [(f"RegMean++ (alpha={picked['RegMean++']})", f"RegMean (alpha={picked['RegMean']})")]
        gains = list(dict.fromkeys([*gains, *pair, (f"RegMean++ (alpha={HEADLINE})", f"RegMean (alpha={HEADLINE})")]))
    val = {"domains": res["domains"], "seeds": res["seeds"], "rows": validation, "settings": res["settings"]}
    report.write(val, os.path.join(out, "validation"), pair, title=f"{title}: the merges on the validation split")
    paths = report.write(res, out, gains, title=title)
    print(f"\n{title} ({len(res['seeds'])} seeds, {res['seconds']:.0f} s this run): validation accuracy (%)")
    print(report.text_table(val, pair))
    print("picked on validation: " + ", ".join(f"{m} alpha {a}" for m, a in picked.items()))
    print(f"\n{title}: test accuracy (%)")
    print(report.text_table(res, gains))
    print("wrote " + ", ".join(paths.values()))
    return paths


def run_digits(seeds, out, alphas=ALPHAS):
    """Every method on the test split; RegMean and RegMean++ over `alphas`, each one's alpha picked on the
    validation split (OUT/validation/results.*)."""
    import torch

    torch.set_num_threads(1)  # tiny matmuls
    rows: dict = {}
    validation: dict = {}
    t0 = time.perf_counter()
    for s in seeds:
        r = digits.run(seed=s, alpha=HEADLINE, extra=True, sweep=alphas, plusplus=alphas)
        for name, per_dom in r["rows"].items():
            rows.setdefault(name, {})[str(s)] = per_dom
        for name, per_dom in r["validation"].items():
            validation.setdefault(name, {})[str(s)] = per_dom
    settings = {"mlp": "64-256-256-10", "pretrain": "5 epochs, 1500 MNIST-8x8", "finetune": "10 epochs",
                "split": "60/10/30 train/validation/test", "alphas": list(alphas)}
    res = {"domains": list(digits.DOMAINS), "seeds": list(seeds), "rows": rows, "validation": validation,
           "settings": settings, "seconds": time.perf_counter() - t0}
    rm = f"RegMean (alpha={HEADLINE})"
    return write_with_validation(res, out, {"RegMean": alphas, "RegMean++": alphas},
                                 [(rm, "simple average"), (rm, "Fisher")], "digits, from scratch (MLP)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--skip-sentiment", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--quick", action="store_true", help="the demo's sizes and training (400/300 examples, 3 epochs) with every method and seed")
    p.add_argument("--alphas-only", action="store_true",
                   help="sentiment: only the RegMean and RegMean++ sweeps beside average and Fisher (no ensemble, "
                        "multi-task, cross-domain rows, task arithmetic or TIES), into OUT/sentiment-alphas")
    p.add_argument("--plusplus", type=float, nargs="*", default=list(ALPHAS),
                   help="RegMean++ alphas in the sentiment setup (default: the sweep; none: leave it out)")
    a = p.parse_args(argv)
    if not a.skip_digits:
        run_digits(a.seeds, os.path.join(a.out, "digits"))
    if not a.skip_sentiment:
        alphas = (HEADLINE, *[x for x in ALPHAS if x != HEADLINE])
        cfg = dataclasses.replace(sentiment.FULL, seeds=tuple(a.seeds), alphas=alphas,
                                  plusplus_alphas=tuple(a.plusplus), n_val=N_VAL)
        if a.quick:
            d = sentiment.DEMO   # the demo's training and statistics (its seed-0 models are reused from the cache)
            cfg = dataclasses.replace(cfg, n_train=d.n_train, n_test=d.n_test, epochs=d.epochs, lr=d.lr,
                                      stats_examples=d.stats_examples)
        if a.alphas_only:
            cfg = dataclasses.replace(cfg, baselines=("average", "fisher"), ensemble=False, multitask=False,
                                      cross=False)
        try:
            res = sentiment.run(cfg)
        except fetch.FetchError as e:
            print(f"regmean_fast: error: {e}", file=sys.stderr)
            return 2
        write_with_validation(res, os.path.join(a.out, "sentiment-alphas" if a.alphas_only else "sentiment"),
                              {"RegMean": cfg.alphas, "RegMean++": cfg.plusplus_alphas},
                              sentiment.default_gains(cfg), "all-MiniLM-L6-v2 on 4 VADER domains")
    return 0


if __name__ == "__main__":
    sys.exit(main())
