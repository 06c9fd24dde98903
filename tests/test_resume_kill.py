"""Killed at any moment (SIGKILL: out of memory, a pre-empted node), "the same command plus --resume" finishes
the job: byte-identical to an uninterrupted run, and nothing partial ever stands at the final path.

Each run is a child of a fork server that imported torch, transformers and regmean_fast once (a fresh
interpreter costs seconds per run); REGMEAN_FAST_KILL_AT (regmean_fast.io.resume.kill_point) names the point
at which the child SIGKILLs itself, so every point is hit exactly, with no timing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_tiny  # noqa: E402
from test_merge_common import saved_models_and_grams  # noqa: E402

import regmean_fast  # noqa: E402
from regmean_fast.io.resume import KILL_ENV  # noqa: E402

KILLED = -signal.SIGKILL
_CTX = None


# imported once by the fork server (Python 3.11's forkserver ignores the parent's sys.path there, so
# only what PYTHONPATH or the working directory reaches: not this module, which each child imports quickly)
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "safetensors.torch", "pytest",
           "regmean_fast.cli", "regmean_fast.grams.collect", "regmean_fast.grams.command",
           "regmean_fast.grams.sequential", "regmean_fast.merge.api"]


def _child(argv, kill, log, package):
    """In the fork server's child: the command with stdout/stderr into `log`, dying at `kill` if given."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    assert regmean_fast.__file__ == package, (regmean_fast.__file__, package)  # the code under test
    os.environ.pop(KILL_ENV, None)
    if kill:
        os.environ[KILL_ENV] = kill
    torch.set_num_threads(1)  # the same in every run: the bytes compared do not depend on it anyway
    from regmean_fast.cli import main

    sys.exit(main([str(a) for a in argv]))


def run(tmp, argv, kill=None):
    """-> (exit code, negative for a signal; what it printed)."""
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    log = os.path.join(tmp, "log.txt")
    p = _CTX.Process(target=_child, args=(list(argv), kill, log, regmean_fast.__file__))
    p.start()
    p.join(180)
    if p.exitcode is None:
        p.kill()
        pytest.fail(f"{argv} did not finish")
    with open(log) as f:
        return p.exitcode, f.read()


def kill_then_resume(tmp, argv, kills, snapshot, ref):
    """Run `argv` killed at each point of `kills` in turn (the first plain, then each with --resume), checking
    after every kill that the final path holds nothing or the whole result; then --resume to the end."""
    for i, kill in enumerate(kills):
        rc, log = run(tmp, argv + (["--resume"] if i else []), kill)
        assert rc == KILLED, f"{kill}: exit {rc} (the point was not reached?)\n{log}"
        now = snapshot()
        assert now is None or now == ref, f"killed at {kill}: something partial stands at the final path"
    rc, log = run(tmp, argv + ["--resume"])
    assert rc == 0, log
    assert snapshot() == ref
    return log


def test_resume_action_rules():
    """io.resume's table, on its own: what --resume does with an output and a partial state found or not."""
    from regmean_fast.io.resume import CONTINUE, DONE, FRESH, Found, ResumeError, resume_action

    ours, other_out, other_part = Found("OUT"), Found("OUT", "was made otherwise"), Found("CKPT", "CKPT is not ours")
    assert resume_action(None, None, "CKPT") == (FRESH, "--resume: nothing to resume from (no CKPT); starting "
                                                        "from the beginning")
    assert resume_action(None, Found("CKPT"), "CKPT") == (CONTINUE, None)
    for partial in (None, Found("CKPT"), other_part):  # complete and ours: nothing else matters
        for force in (False, True):
            assert resume_action(ours, partial, "CKPT", force)[0] == DONE
    with pytest.raises(ResumeError, match=r"^--resume: OUT exists but was made otherwise \(pass --force"):
        resume_action(other_out, Found("CKPT"), "CKPT")
    assert resume_action(other_out, Found("CKPT"), "CKPT", force=True) == (CONTINUE, None)  # replaced at the end
    assert resume_action(other_out, None, "CKPT", force=True)[0] == FRESH
    with pytest.raises(ResumeError, match="^CKPT is not ours$"):
        resume_action(None, other_part, "CKPT")


# ---------------------------------------------------------------------------------------------------
# grams: 12 examples in 6 batches, a checkpoint every 2 batches (sequential: every decoder block), the Gram
# file sharded beside g.safetensors so the final write has steps of its own


@pytest.fixture(scope="module")
def grams_ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-grams")
    model = hf_tiny.save_tiny(root / "llama", "llama")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in hf_tiny.random_texts(12, seed=4)))
    refs = {}
    for mode in ("whole-model", "sequential"):
        d = root / mode
        d.mkdir()
        rc, log = run(d, _grams_argv(model, data, d, mode))
        assert rc == 0, log
        refs[mode] = _gram_files(d)
        assert len(refs[mode]) > 2 and "g.safetensors.index.json" in refs[mode]
    return model, data, refs


def _grams_argv(model, data, d, mode):
    return ["grams", model, "--data", data, "--out", d / "g.safetensors", "--batch-size", 2, "--shard-size",
            "10KB", "--checkpoint-every", 2 if mode == "whole-model" else 1, "--no-progress",
            *(["--sequential"] if mode == "sequential" else [])]


_GRAM_FILE = re.compile(r"g(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def _gram_files(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)) if _GRAM_FILE.fullmatch(f)}


def _grams_check(d):
    """None while the Gram file is not in place (its index is what names it), else every file of it."""
    files = _gram_files(d)
    return files if "g.safetensors.index.json" in files else None


# whole-model: 6 steps (batches), checkpoints after steps 2 and 4
WHOLE = [
    ["grams.start"],                        # before the data is read
    ["grams.loaded"],                       # model and data loaded, before the first batch
    ["grams.step@1"],                       # before the first checkpoint
    ["grams.checkpoint-tmp@1"],             # writing the first checkpoint
    ["grams.step@3"],                       # between checkpoints
    ["grams.step@6"],                       # after the last batch, before the Gram file
    ["grams-file.written"],                 # the Gram file written, not yet in place
    ["grams-file.shard-placed@2"],          # two of its shards in place, not its index
    ["grams.written"],                      # in place, checkpoint not yet removed
    ["grams.finished"],                     # after everything
    # killed again and again while resuming, from each state the previous kill left
    ["grams.step@3", "grams.step@1", "grams.checkpoint-tmp@1", "grams-file.shard-placed@1", "grams.finished"],
]
# sequential: 3 parts (2 blocks, the head) x 6 batches = 18 steps; checkpoints after steps 6 and 12
SEQUENTIAL = [
    ["grams.loaded"],
    ["grams.step@4"],                       # in block 0, before the first checkpoint
    ["grams.checkpoint-tmp@1"],
    ["grams.step@9"],                       # mid block 1, between checkpoints
    ["grams.step@18"],
    ["grams-file.written"],
    ["grams.written"],
    ["grams.step@9", "grams.step@5", "grams.checkpoint-tmp@1", "grams.finished"],
]


@pytest.mark.parametrize("mode,kills", [("whole-model", k) for k in WHOLE] + [("sequential", k) for k in SEQUENTIAL],
                         ids=lambda v: "+".join(v) if isinstance(v, list) else v)
def test_grams_killed_anywhere_then_resumed(grams_ref, tmp_path, mode, kills):
    model, data, refs = grams_ref
    argv = _grams_argv(model, data, tmp_path, mode)
    log = kill_then_resume(tmp_path, argv, kills, lambda: _grams_check(tmp_path), refs[mode])
    if kills[-1] in ("grams.start", "grams.loaded"):
        assert "nothing to resume from" in log, log
    if kills[-1] in ("grams.written", "grams.finished"):
        assert "is complete and was made by this command; nothing to do" in log, log
    # the checkpoint and any half-written one are gone; the Gram file's own temporary folder of a kill
    # during its write is hidden (.g.tmp-*) and left: the output transaction of issue 12 owns that
    assert sorted(f for f in os.listdir(tmp_path) if not f.startswith(".")) == sorted(["log.txt", *refs[mode]])


# ---------------------------------------------------------------------------------------------------
# merge: 3 models, 5 shards of 12 KB


@pytest.fixture(scope="module")
def merge_ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-merge")
    _, paths, grams = saved_models_and_grams(root, k=3, seed=21)
    d = root / "ref"
    d.mkdir()
    argv = lambda d: ["merge", "--models", *paths, "--grams", *grams, "--alpha", 0.9,  # noqa: E731
                      "--shard-size", "12KB", "--out", d / "out"]
    rc, log = run(d, argv(d))
    assert rc == 0, log
    ref = _merge_files(d / "out")
    assert len([f for f in ref if f.startswith("model-")]) >= 4
    return argv, ref


def _merge_files(out):
    if not os.path.exists(out):
        return None
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))
            if f.endswith((".safetensors", ".index.json", "config.json"))}


MERGE = [
    ["merge.start"],
    ["merge.partial-created"],              # the partial folder made, no manifest yet
    ["shard.tensor@1"],                     # the first shard half on disk
    ["shard.recorded@1"],
    ["shard.tensor@9"],                     # between shards, one half written
    ["shard.recorded@4"],
    ["merge.finalised"],                    # every file in the partial folder, before the rename
    ["merge.renamed"],                      # in place, its manifest not yet removed
    ["merge.finished"],
    ["shard.recorded@2", "shard.tensor@2", "shard.recorded@1", "merge.renamed"],
]


@pytest.mark.parametrize("kills", MERGE, ids=lambda v: "+".join(v))
def test_merge_killed_anywhere_then_resumed(merge_ref, tmp_path, kills):
    argv, ref = merge_ref
    out = tmp_path / "out"
    log = kill_then_resume(tmp_path, argv(tmp_path), kills, lambda: _merge_files(out), ref)
    if kills[-1] in ("merge.start", "merge.partial-created"):
        assert "nothing to resume from" in log, log
    if kills[-1] in ("merge.renamed", "merge.finished"):
        assert "is complete and was made by this command; nothing to do" in log, log
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "out"]  # no partial folder left
    assert not [f for f in os.listdir(out) if "manifest" in f]


@pytest.mark.parametrize("kill", ["merge.swapping", "merge.renamed"])
def test_merge_killed_while_replacing_with_force(merge_ref, tmp_path, kill):
    """--force over an earlier output, killed between its two renames (no OUT at all for a moment) or just
    after them: the same command plus --resume puts the merge in place and the earlier output goes."""
    argv, ref = merge_ref
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an earlier output")
    argv = argv(tmp_path) + ["--force"]
    kill_then_resume(tmp_path, argv, [kill], lambda: _merge_files(out), ref)
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "out"]  # the earlier output, set aside, is gone too
