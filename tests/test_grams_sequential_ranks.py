"""grams --sequential under torchrun (2 ranks, gloo on the CPU): at the end of every block the ranks sum that block's
Grams into rank 0, which keeps the sums in its work folder; the other ranks keep nothing on disk. A stop asked on
one rank stops every rank at the end of the block under way; --resume goes on when every rank's checkpoint is of
the same block, and otherwise starts afresh. Ranks are real processes (test_distributed.launch)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402
from test_distributed import _assert_grams_match, launch  # noqa: E402

from regmean_fast import load_grams  # noqa: E402
from regmean_fast.cli import main  # noqa: E402
from regmean_fast.grams.checkpoint import checkpoint_path, work_folder  # noqa: E402

STOP = "REGMEAN_FAST_GRAMS_INTERRUPT_AFTER"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny Llama with 3 blocks, 13 texts in 7 batches of 2 (4 on rank 0, 3 on rank 1); its one-process
    --sequential file and its uninterrupted 2-rank one."""
    root = tmp_path_factory.mktemp("seq_ranks")
    model = hf_tiny.save_tiny(root / "llama", "llama", num_hidden_layers=3)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in hf_tiny.random_texts(13, seed=3)))
    argv = ["grams", model, "--data", str(data), "--batch-size", "2", "--no-progress", "--sequential"]
    one, two = root / "one.safetensors", root / "two.safetensors"
    assert main([*argv, "--out", str(one)]) == 0
    res = launch([*argv, "--out", two])
    assert [rc for rc, _ in res] == [0, 0], res
    return argv, one, two


def _state(ckpt):
    from safetensors import safe_open

    with safe_open(ckpt, "pt") as f:
        return list(f.keys()), json.loads(f.metadata()["state"])


def test_blocks_summed_into_rank0_as_they_finish(runs, tmp_path):
    """Equal to one process (counts exactly, Grams within the fp32 bound); a stop asked on one rank mid-block stops
    both at that block's end, with only rank 0 holding the summed blocks on disk; resumed twice, the file is
    byte-identical to the uninterrupted 2-rank run's."""
    argv, one, two = runs
    ref = load_grams(one)
    _assert_grams_match(load_grams(two, verify=True), ref)
    assert load_grams(two).metadata["ranks"] == 2 and ref.metadata["batches"] == 7

    out = tmp_path / "g.safetensors"
    ckpts = [checkpoint_path(str(out), r, 2) for r in range(2)]
    # rank 1 asks to stop after its first batch of block 1 (of 3 batches), rank 0 never: both stop after block 1
    res = launch([*argv, "--out", out], rank_env={1: {STOP: "1"}})
    assert [rc for rc, _ in res] == [130, 130], res
    assert all("interrupted before decoder block 2 of 3, batch 1 of" in err for _, err in res), res
    assert not out.exists()
    assert sorted(os.listdir(work_folder(ckpts[0]))) == ["part-00000.safetensors"]
    assert not os.path.exists(work_folder(ckpts[1]))  # rank 1 gave its block's Grams to rank 0
    keys1, state1 = _state(ckpts[1])
    assert not [k for k in keys1 if k.startswith("gram.")] and not state1["spilled"] and not state1["counts"]
    assert state1["part"] == 1 and state1["batch"] == 0 and state1["batches"] == 3  # its own share's totals
    _, state0 = _state(ckpts[0])
    block0 = sorted(k for k in ref.keys() if k.startswith("model.layers.0."))
    assert sorted(state0["spilled"]) == sorted(state0["summed"]) == block0
    assert all(state0["counts"][k] == ref.count(k) for k in block0)  # the sums of both ranks' counts
    from safetensors import safe_open

    with safe_open(os.path.join(work_folder(ckpts[0]), "part-00000.safetensors"), "pt") as f:
        import torch

        for k in block0:  # the summed block as the file will hold it
            torch.testing.assert_close(torch.triu(f.get_tensor(k)), torch.triu(load_grams(two).raw_gram(k)),
                                       rtol=0, atol=0)

    # resumed; now rank 0 asks to stop (every block checkpointed): both stop after block 2
    res = launch([*argv, "--out", out, "--resume", "--checkpoint-every", "1"], rank_env={0: {STOP: "1"}})
    assert [rc for rc, _ in res] == [130, 130], res
    assert all("resuming from" in err and "at decoder block 2 of 3, batch 1" in err for _, err in res), res
    assert sorted(os.listdir(work_folder(ckpts[0]))) == ["part-00000.safetensors", "part-00001.safetensors"]
    assert not os.path.exists(work_folder(ckpts[1]))
    assert all(_state(c)[1]["part"] == 2 for c in ckpts)

    res = launch([*argv, "--out", out, "--resume"])
    assert [rc for rc, _ in res] == [0, 0], res
    assert open(out, "rb").read() == open(two, "rb").read()
    assert sorted(os.listdir(tmp_path)) == ["g.safetensors"]  # no checkpoint, no work folder left


def test_resume_with_a_rank_checkpoint_lost_starts_afresh(runs, tmp_path):
    """Rank 1's checkpoint deleted: the ranks' checkpoints disagree, so every rank starts from the beginning (a note
    on rank 0; rank 0's checkpoint and summed blocks are dropped) and the file equals the uninterrupted run's."""
    argv, _, two = runs
    out = tmp_path / "g.safetensors"
    res = launch([*argv, "--out", out], extra_env={STOP: "5"})  # both mid block 1 (4 and 3 batches a block)
    assert [rc for rc, _ in res] == [130, 130], res
    os.remove(checkpoint_path(str(out), 1, 2))
    res = launch([*argv, "--out", out, "--resume"])
    assert [rc for rc, _ in res] == [0, 0], res
    assert "note: the ranks' checkpoints are not all at the start of the same block (part 2 batch 0, none); " \
           "starting from the beginning" in res[0][1], res[0][1]
    assert "nothing to resume from" in res[1][1] and not any("resuming from" in err for _, err in res), res
    assert open(out, "rb").read() == open(two, "rb").read()
    assert sorted(os.listdir(tmp_path)) == ["g.safetensors"]


def test_fewer_batches_than_ranks_refused(runs, tmp_path):
    argv, _, _ = runs
    out = tmp_path / "g.safetensors"
    res = launch([*argv, "--max-examples", "1", "--out", out])
    for rc, err in res:
        assert rc == 2 and "needs at least one batch per rank; the data makes 1" in err, res
    assert os.listdir(tmp_path) == []
