"""Tables (plain text, Markdown, JSON) and the comparison plot of a quality run.

results: {"seeds": [..], "domains": [..], "rows": {row: {str(seed): {domain: acc}}}, ...}.
A row's mean is over domains; its spread is the standard deviation of that mean over seeds.
"""

from __future__ import annotations

import json
import math
import os


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs):
    if len(xs) < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarize(results: dict) -> list[dict]:
    """One dict per row: per-domain accuracy (mean over seeds), mean over domains (mean, std over seeds,
    per-seed values)."""
    domains = results["domains"]
    out = []
    for row, per_seed in results["rows"].items():
        seeds = sorted(per_seed, key=lambda s: int(s))
        dom = {d: _mean([per_seed[s][d] for s in seeds if d in per_seed[s]]) for d in domains}
        means = [_mean([per_seed[s][d] for d in domains if d in per_seed[s]]) for s in seeds]
        out.append({"row": row, "domains": dom, "mean": _mean(means), "std": _std(means),
                    "per_seed": dict(zip(seeds, means))})
    return out


def gain(results: dict, row: str, over: str) -> dict | None:
    """row - over on the mean over domains, per seed, with mean and std over seeds."""
    rows = results["rows"]
    if row not in rows or over not in rows:
        return None
    domains = results["domains"]
    seeds = sorted(set(rows[row]) & set(rows[over]), key=int)
    diffs = [_mean([rows[row][s][d] for d in domains]) - _mean([rows[over][s][d] for d in domains]) for s in seeds]
    dom = {d: _mean([rows[row][s][d] - rows[over][s][d] for s in seeds]) for d in domains}
    return {"row": row, "over": over, "per_seed": dict(zip(seeds, diffs)), "mean": _mean(diffs), "std": _std(diffs),
            "domains": dom}


def _fmt(x, pct=True):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def _spread(s):
    return "" if math.isnan(s["std"]) else f" ± {100 * s['std']:.1f}"


def _table_rows(results: dict, gains, minus: str):
    """(is_gain, label, per-domain cells, mean cell, spread) for every row of a results table: the
    summarised methods, then the gains ("row{minus}over") that can be computed. Cells are formatted
    percentages; markdown and text_table only lay them out."""
    domains = results["domains"]
    for s in summarize(results):
        yield False, s["row"], [_fmt(s["domains"][d]) for d in domains], _fmt(s["mean"]), _spread(s)
    for row, over in gains:
        g = gain(results, row, over)
        if g is not None:
            yield (True, f"{row}{minus}{over}", [f"{100 * g['domains'][d]:+.1f}" for d in domains],
                   f"{100 * g['mean']:+.1f}", _spread(g))


def markdown(results: dict, gains=()) -> str:
    domains = results["domains"]
    n = len(results["seeds"])
    lines = [f"| method | {' | '.join(domains)} | mean (± std over {n} seed{'s' if n > 1 else ''}) |",
             "|---|" + "---|" * (len(domains) + 1)]
    for is_gain, label, cells, mean, spread in _table_rows(results, gains, " − "):
        lines.append(f"| {f'*{label}*' if is_gain else label} | " + " | ".join(cells) + f" | **{mean}**{spread} |")
    return "\n".join(lines)


def text_table(results: dict, gains=()) -> str:
    rows = list(_table_rows(results, gains, " - "))
    w = max([len(label) for _, label, *_ in rows] + [6])
    head = f"  {'method':<{w}}  " + "  ".join(f"{d:>7}" for d in results["domains"]) + f"  {'mean':>7}"
    lines = [head, "  " + "-" * (len(head) - 2)]
    for _, label, cells, mean, spread in rows:
        lines.append(f"  {label:<{w}}  " + "  ".join(f"{c:>7}" for c in cells) + f"  {mean:>7}{spread}")
    return "\n".join(lines)


def write(results: dict, out_dir: str, gains=(), title: str = "RegMean quality") -> dict:
    """results.json, results.md, comparison.png (when matplotlib is installed) in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    data = dict(results, summary=summarize(results), gains=[g for g in (gain(results, r, o) for r, o in gains) if g])
    p = os.path.join(out_dir, "results.json")
    with open(p, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
    paths["json"] = p
    p = os.path.join(out_dir, "results.md")
    with open(p, "w") as f:
        f.write(f"# {title}\n\n{markdown(results, gains)}\n")
        if results.get("settings"):
            f.write("\nSettings: `" + json.dumps(results["settings"], sort_keys=True) + "`\n")
    paths["md"] = p
    try:
        paths["png"] = plot(results, os.path.join(out_dir, "comparison.png"), title)
    except ImportError:
        pass
    return paths


def plot(results: dict, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = [s for s in summarize(results) if not s["row"].startswith("model fine-tuned on")]  # those: table only
    domains = results["domains"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 0.45 * len(summ) + 2.5),
                                 gridspec_kw={"width_ratios": [1, 2]})
    names = [s["row"] for s in summ][::-1]
    means = [100 * s["mean"] for s in summ][::-1]
    errs = [0 if math.isnan(s["std"]) else 100 * s["std"] for s in summ][::-1]
    colors = ["tab:red" if n.startswith("RegMean") else "tab:gray" if n.startswith("individual") else "tab:blue"
              for n in names]
    a1.barh(names, means, xerr=errs, color=colors)
    lo = min(means + [100 * s["domains"][d] for s in summ for d in domains]) - 3
    a1.set_xlim(max(0, lo), 100)
    a1.set_xlabel("mean accuracy over domains (%), ± std over seeds")
    a1.set_title(title)
    width = 0.8 / max(1, len(summ))
    for i, s in enumerate(summ):
        xs = [j + i * width for j in range(len(domains))]
        a2.bar(xs, [100 * s["domains"][d] for d in domains], width, label=s["row"])
    a2.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))])
    a2.set_xticklabels(domains)
    a2.set_ylim(max(0, lo), 100)
    a2.set_ylabel("accuracy (%), mean over seeds")
    a2.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
