"""Scale-out (issue #8): `grams` and `merge` with 2 gloo processes on the CPU, against one process.

Ranks are real processes running `python -m regmean_fast ...`: once through torchrun
(`python -m torch.distributed.run`), otherwise started here with torchrun's variables (WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT from a socket bound to port 0), which lets a test
read every rank's exit status and stderr. Loopback only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402
from test_merge_common import (make_activations, make_models, save_model, saved_models_and_grams,  # noqa: E402
                               write_gram_files)

from regmean_fast import load_grams  # noqa: E402
from regmean_fast.cli import main  # noqa: E402
from regmean_fast.distributed import assign_greedy, shard_indices  # noqa: E402
from regmean_fast.grams.checkpoint import checkpoint_path  # noqa: E402
from regmean_fast.merge import merge  # noqa: E402

U = 2.0 ** -24  # fp32 unit roundoff
LAUNCH_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra=None):
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "REGMEAN_FAST_DIST_TIMEOUT": "60", "PYTHONPATH": os.pathsep.join(
                    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                    + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))})
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra or {})
    return env


def launch(argv, n=2, extra_env=None, rank_env=None):
    """Run `python -m regmean_fast ARGV` as n ranks (torchrun's variables); -> [(rc, stderr)] per rank.
    rank_env: {rank: variables} for some ranks only."""
    port = str(_free_port())
    procs = []
    for r in range(n):
        env = _env(dict(extra_env or {}, **(rank_env or {}).get(r, {})))
        env.update({"WORLD_SIZE": str(n), "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(n),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        procs.append(subprocess.Popen([sys.executable, "-m", "regmean_fast", *map(str, argv)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=LAUNCH_TIMEOUT)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


# ---------------------------------------------------------------------------------------------------
# pure helpers


def test_sharding_and_greedy_assignment():
    for n in (0, 1, 5, 13):
        for w in (1, 2, 3, 8):
            parts = [shard_indices(n, r, w) for r in range(w)]
            assert sorted(i for p in parts for i in p) == list(range(n))  # none twice, none dropped
    # largest first onto the least loaded rank (ties: lowest rank): 8->0, 5->1, 3->1, 3->0, 1->1
    assert assign_greedy([1, 8, 3, 3, 5], 2) == [1, 0, 1, 0, 1]
    assert assign_greedy([2.0, 2.0], 4) == [0, 1]


# ---------------------------------------------------------------------------------------------------
# statistics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = hf_tiny.save_tiny(root / "llama", "llama")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in hf_tiny.random_texts(13, seed=3)))
    return root, model, str(data)


def _assert_grams_match(got, ref):
    """Counts exactly equal; every Gram entry within the fp32 bound of a sum of n products taken in another
    order: |G2_ij - G1_ij| <= 2 (n - 1) u sum_t |x_ti x_tj| <= 2 (n - 1) u sqrt(G_ii G_jj)  (Cauchy-Schwarz),
    n the token count, u = 2^-24."""
    assert got.modules() == ref.modules()
    for m in ref.modules():
        assert got.gram_key(m) == ref.gram_key(m)
        assert got.count(m) == ref.count(m)
        g1 = ref.gram(m).double()
        g2 = got.gram(m).double()
        dg = g1.diagonal().clamp_min(0)
        bound = 2 * (ref.count(m) - 1) * U * torch.sqrt(dg[:, None] * dg[None, :]) + 1e-30
        assert bool(((g2 - g1).abs() <= bound).all()), m
    for k in ("examples", "tokens", "batches"):
        assert got.metadata[k] == ref.metadata[k]


@pytest.mark.parametrize("mode", ["whole-model", "sequential"])
def test_grams_two_ranks_equal_one_process_with_resume(mode, tiny, tmp_path, capsys):
    """2 ranks, each interrupted after its first step (per-rank checkpoints, nothing written), then
    resumed through torchrun: the statistics equal one process's (counts exactly, Grams within the bound)."""
    root, model, data = tiny
    common = ["--data", data, "--batch-size", "2", "--no-progress", *(["--sequential"] if mode == "sequential" else [])]
    one = tmp_path / "one.safetensors"
    assert main(["grams", model, *common, "--out", str(one)]) == 0
    capsys.readouterr()
    out = tmp_path / "two.safetensors"
    res = launch(["grams", model, *common, "--out", out], extra_env={"REGMEAN_FAST_GRAMS_INTERRUPT_AFTER": "1"})
    assert [rc for rc, _ in res] == [130, 130], res
    assert not out.exists()
    for r in range(2):
        assert os.path.exists(checkpoint_path(str(out), r, 2))
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "regmean_fast", "grams", model, *common,
           "--out", str(out), "--resume"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    g1, g2 = load_grams(one), load_grams(out, verify=True)
    _assert_grams_match(g2, g1)
    assert g2.metadata["ranks"] == 2 and g1.metadata["batches"] == 7 and g2.metadata["mode"] == mode
    assert not [f for f in os.listdir(tmp_path) if "checkpoint" in f]


def test_grams_resume_with_nothing_then_everything_done(tiny, tmp_path):
    """--resume under torchrun with no checkpoint: every rank starts afresh (a note each); again on the finished
    file: rank 0 finds it complete and made by this command, every rank exits 0, nothing rewritten."""
    root, model, data = tiny
    out = tmp_path / "g.safetensors"
    argv = ["grams", model, "--data", data, "--batch-size", "2", "--no-progress", "--out", out, "--resume"]
    res = launch(argv)
    assert [rc for rc, _ in res] == [0, 0], res
    for r, (_, err) in enumerate(res):
        assert f"regmean_fast[rank {r}/2]: note: --resume: nothing to resume from" in err, err
    stamp = os.stat(out).st_mtime_ns
    res = launch(argv)
    assert [rc for rc, _ in res] == [0, 0], res
    assert "is complete and was made by this command; nothing to do" in res[0][1], res[0][1]
    assert "note" not in res[1][1], res[1][1]
    assert os.stat(out).st_mtime_ns == stamp and sorted(os.listdir(tmp_path)) == ["g.safetensors"]


# ---------------------------------------------------------------------------------------------------
# merge


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("dmerge")
    _, paths, grams = saved_models_and_grams(root, k=2, seed=5)
    cfg = {"models": [{"model": p, "grams": g} for p, g in zip(paths, grams)], "parameters": {"alpha": 0.9},
           "shard_size": "12KB"}
    argv = ["merge", "--models", *paths, "--grams", *grams, "--alpha", "0.9", "--shard-size", "12KB"]
    return cfg, argv


def _files(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))
            if f.endswith(".safetensors") or f.endswith(".index.json")}


@pytest.fixture(scope="module")
def ref_files(fx, tmp_path_factory):
    ref = tmp_path_factory.mktemp("dref") / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1)
    try:
        merge(fx[0], out=str(ref))
    finally:
        torch.set_num_threads(threads)
    files = _files(ref)
    assert len(files) > 4
    return files


def test_merge_two_ranks_bit_identical(fx, ref_files, tmp_path):
    out = tmp_path / "out"
    res = launch([*fx[1], "--out", out, "--json"])
    assert [rc for rc, _ in res] == [0, 0], res
    assert _files(out) == ref_files
    assert not [f for f in os.listdir(out) if "manifest" in f]
    rep = json.load(open(out / "merge_report.json"))
    from test_merge_common import read_folder

    assert rep["groups"] > 0 and set(rep["tensors"]) == set(read_folder(out))
    assert not [n for n, e in rep["tensors"].items() if e["method"] == "reused"]  # each from its owner
    assert rep["reused_shards"] == []


def test_merge_rank_killed_then_resume(fx, ref_files, tmp_path):
    out = tmp_path / "out"
    partial = tmp_path / ".out.regmean-partial"
    res = launch([*fx[1], "--out", out], extra_env={"REGMEAN_FAST_MERGE_DIE_AFTER_SHARDS": "1:1"})
    (rc0, err0), (rc1, _) = res
    assert rc1 == 17 and rc0 == 3, res
    assert "regmean_fast: error:" in err0 and "lost contact" in err0 and "Traceback" not in err0
    assert not out.exists() and partial.is_dir()  # nothing that looks complete
    assert not (partial / "config.json").exists() and not (partial / "model.safetensors.index.json").exists()
    mans = [json.load(open(partial / f)) for f in os.listdir(partial) if f.startswith("regmean-manifest")]
    assert sum(len(m["shards"]) for m in mans) >= 1
    res = launch([*fx[1], "--out", out, "--resume", "--json"])
    assert [rc for rc, _ in res] == [0, 0], res
    assert _files(out) == ref_files
    rep = json.load(open(out / "merge_report.json"))
    assert len(rep["reused_shards"]) >= 1
    assert not partial.exists()
    stamps = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    res = launch([*fx[1], "--out", out, "--resume"])  # finished: rank 0 says so, every rank agrees
    assert [rc for rc, _ in res] == [0, 0], res
    assert "is complete and was made by this command; nothing to do" in res[0][1], res[0][1]
    assert {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)} == stamps and not partial.exists()


def test_merge_rank_raises_stops_every_rank(tmp_path):
    """A rank that raises (a non-finite weight in one of its shards) stops the other with a clear error."""
    _, models = make_models("llama", k=2, seed=5)
    with torch.no_grad():
        models[1].model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    mods, acts = make_activations(models[0], 2, seed=5)
    paths = [save_model(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    grams = write_gram_files(models[0], mods, acts, tmp_path)
    out = tmp_path / "out"
    res = launch(["merge", "--models", *paths, "--grams", *grams, "--shard-size", "12KB", "--out", out])
    rcs = sorted(rc for rc, _ in res)
    assert rcs == [2, 3], res  # the failing rank: bad input (2); the other: stopped by it (3)
    errs = "".join(err for _, err in res)
    assert "non-finite values" in errs and "failed: model 1" in errs and "Traceback" not in errs
    assert not out.exists()
