"""merge --method regmean++ under torchrun (2 ranks, gloo on the CPU): each rank runs its share of every model's
calibration batches, the block Grams are summed into rank 0, which merges and writes; every rank advances its own
hidden states through the merged block. Ranks are real processes (test_distributed.launch)."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_distributed import LAUNCH_TIMEOUT, _env, _free_port, launch  # noqa: E402
from test_regmean_pp import _data, _load, _rel_err, _save, regmean_pp_oracle  # noqa: E402


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three tiny Llamas, or GPT-2s with a classifier (the generic path, a head part), each with 7 or 8 texts:
    4 batches of 2 per model, 2 per rank."""
    root = tmp_path_factory.mktemp("pp_ranks")
    out = {}
    for kind in ("llama", "gpt2-cls"):
        folders = [str(root / kind / f"m{i}") for i in range(3)]
        for i, f in enumerate(folders):
            _save(f, kind, seed=i)
        data = [_data(str(root / kind), 7 + i % 2, seed=30 + i) for i in range(3)]
        out[kind] = (folders, data)
    return root, out


def _args(folders, data, out, *extra):
    return ["merge", "--method", "regmean++", "--models", *folders, "--data", *data, "--batch-size", "2",
            "--shard-size", "12KB", "--out", str(out), *extra]


def _shards(folder):
    return {p: _load_shards(folder, p) for p in sorted(os.listdir(folder)) if p.endswith(".safetensors")}


def _load_shards(folder, name):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, name))


@pytest.mark.parametrize("kind", ["llama", "gpt2-cls"])
def test_two_ranks_equal_one_process_and_the_fp64_loop(kind, three, tmp_path):
    """torchrun's own launcher, 2 ranks: the tensors equal one process's within fp32 reduction error (the Grams
    summed in another order) and the independent fp64 loop's as closely as one process's do."""
    root, models = three
    folders, data = models[kind]
    from regmean_fast.cli import main

    assert main(_args(folders, data, tmp_path / "one")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "regmean_fast",
           *map(str, _args(folders, data, tmp_path / "two"))]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = _shards(tmp_path / "one"), _shards(tmp_path / "two")
    assert len(one) > 3 and set(one) == set(two)
    want = regmean_pp_oracle(folders, data)
    for shard in one:
        assert set(one[shard]) == set(two[shard])
        for n, t in one[shard].items():
            # the Grams' fp32 sums in another order, through the solve (GPT-2's c_proj: 4e-6 here)
            assert _rel_err(two[shard][n], t) < 1e-5, (n, _rel_err(two[shard][n], t))
            assert _rel_err(two[shard][n], want[n]) < 3e-5, (n, _rel_err(two[shard][n], want[n]))
    a, b = (json.loads((tmp_path / d / "merge_report.json").read_text()) for d in ("one", "two"))
    assert a["groups"] == b["groups"] and set(a["tensors"]) == set(b["tensors"])
    assert not [f for f in os.listdir(tmp_path / "two") if "manifest" in f or "checkpoint" in f]


@pytest.fixture(scope="module")
def ref_two(three, tmp_path_factory):
    """An uninterrupted 2-rank merge of the Llamas."""
    root, models = three
    folders, data = models["llama"]
    ref = tmp_path_factory.mktemp("pp_ranks_ref") / "ref"
    res = launch(_args(folders, data, ref))
    assert [rc for rc, _ in res] == [0, 0], res
    return ref


def _assert_same_shards(out, ref):
    names = sorted(p for p in os.listdir(ref) if p.endswith(".safetensors") or p.endswith("index.json"))
    assert len(names) > 3
    assert sorted(p for p in os.listdir(out) if p.endswith(".safetensors") or p.endswith("index.json")) == names
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_rank_zero_killed_then_resume(three, ref_two, tmp_path):
    """Rank 0 (the writer) dies after two shards: rank 1 stops with a one-line error; --resume with 2 ranks keeps
    the two shards and ends byte-identical to an uninterrupted 2-rank merge."""
    root, models = three
    folders, data = models["llama"]
    out, partial = tmp_path / "out", tmp_path / ".out.regmean-partial"
    res = launch(_args(folders, data, out), extra_env={"REGMEAN_FAST_MERGE_DIE_AFTER_SHARDS": "0:2"})
    (rc0, _), (rc1, err1) = res
    assert rc0 == 17 and rc1 == 3, res
    assert "regmean_fast" in err1 and "error:" in err1 and "Traceback" not in err1, err1
    assert not out.exists() and partial.is_dir()
    res = launch(_args(folders, data, out, "--resume"))
    assert [rc for rc, _ in res] == [0, 0], res
    rep = json.loads((out / "merge_report.json").read_text())
    assert len(rep["reused_shards"]) == 2
    _assert_same_shards(out, ref_two)


@pytest.mark.parametrize("lost", [False, True])
def test_checkpoint_then_resume(lost, three, ref_two, tmp_path):
    """--checkpoint-every 1, both ranks stopped after block 1 of 2 (Stop's test hook: Ctrl-C): a checkpoint per
    rank, exit 130 on both; --resume goes on from block 2 and ends byte-identical to the uninterrupted merge. With
    rank 1's checkpoint lost, the ranks do not agree: every block is merged again (a note), same bytes."""
    root, models = three
    folders, data = models["llama"]
    out, partial = tmp_path / "out", tmp_path / ".out.regmean-partial"
    args = _args(folders, data, out, "--checkpoint-every", "1")
    res = launch(args, extra_env={"REGMEAN_FAST_GRAMS_INTERRUPT_AFTER": "1"})
    assert [rc for rc, _ in res] == [130, 130], res
    ckpts = sorted(p for p in os.listdir(partial) if "checkpoint" in p)
    assert ckpts == [f"regmean-pp-checkpoint.rank{r}-of-2.safetensors" for r in range(2)]
    assert not out.exists()
    if lost:
        os.remove(partial / ckpts[1])
    res = launch([*args, "--resume"])
    assert [rc for rc, _ in res] == [0, 0], res
    if lost:
        assert "checkpoints are not of the same block (1, none)" in res[0][1], res[0][1]
    else:
        assert "resuming from the checkpoint at decoder block 2 of 2" in res[0][1], res[0][1]
    _assert_same_shards(out, ref_two)
    assert not [f for f in os.listdir(out) if "checkpoint" in f] and not partial.exists()


def test_too_few_batches_is_one_line_on_every_rank(three, tmp_path):
    root, models = three
    folders, _ = models["llama"]
    small = [_data(str(tmp_path), 3, seed=70 + i) for i in range(3)]  # 3 texts: one batch of 4
    expect = "its 1 calibration batches are too few for 2 ranks"
    res = launch(_args(folders, small, tmp_path / "out", "--batch-size", "4"))
    assert [rc for rc, _ in res] == [2, 2], res
    for _, err in res:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and expect in lines[0], err
    assert not (tmp_path / "out").exists()
    assert not any(p.name.endswith(".regmean-partial") for p in tmp_path.iterdir())
