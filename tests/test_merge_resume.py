"""Priority (c): temporary folder + rename, manifest, --resume bit-identical, --force."""

from __future__ import annotations

import json
import os

import pytest

from test_merge_common import saved_models_and_grams

from regmean_fast.cli import main
from regmean_fast.merge import MergeError, merge


class Stop(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    _, paths, grams = saved_models_and_grams(root, k=3, seed=21)
    cfg = {"models": [{"model": p, "grams": g} for p, g in zip(paths, grams)], "parameters": {"alpha": 0.9},
           "shard_size": "12KB"}
    return cfg


def _files(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))
            if f.endswith(".safetensors") or f.endswith(".index.json")}


def test_interrupt_then_resume_is_bit_identical(fx, tmp_path):
    ref = tmp_path / "ref"
    merge(fx, out=str(ref))
    ref_files = _files(ref)
    assert len(ref_files) > 3
    out = tmp_path / "out"
    partial = tmp_path / ".out.regmean-partial"
    done = []

    def stop_after(n):
        def cb(fname):
            done.append(fname)
            if len(done) == n:
                raise Stop()
        return cb

    with pytest.raises(KeyboardInterrupt):
        merge(fx, out=str(out), on_shard_done=stop_after(2))
    assert not out.exists() and partial.is_dir()  # never a folder that looks complete
    man = json.load(open(partial / "regmean-manifest.json"))
    assert sorted(man["shards"]) == sorted(done)
    # a second interruption while resuming, after one more shard
    done.clear()
    with pytest.raises(KeyboardInterrupt):
        merge(fx, out=str(out), resume=True, on_shard_done=stop_after(1))
    # corrupt one finished shard: it must be detected and rewritten
    first = sorted(json.load(open(partial / "regmean-manifest.json"))["shards"])[0]
    with open(partial / first, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    rep = merge(fx, out=str(out), resume=True)
    assert first not in rep["reused_shards"] and len(rep["reused_shards"]) == 2
    assert not partial.exists()
    assert _files(out) == ref_files
    assert not (out / "regmean-manifest.json").exists()


def test_resume_refuses_other_configuration(fx, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        merge(fx, out=str(out), on_shard_done=lambda f: (_ for _ in ()).throw(Stop()))
    other = dict(fx, parameters={"alpha": 0.5})
    with pytest.raises(MergeError, match="different configuration"):
        merge(other, out=str(out), resume=True)
    merge(other, out=str(out))  # without --resume it starts again
    assert (out / "config.json").exists() and not (tmp_path / ".out.regmean-partial").exists()


def test_cli_resume_and_force(fx, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        merge(fx, out=str(out), on_shard_done=lambda f: (_ for _ in ()).throw(Stop()))
    args = ["merge", "--models", *[m["model"] for m in fx["models"]], "--grams",
            *[m["grams"] for m in fx["models"]], "--alpha", "0.9", "--shard-size", "12KB", "--out", str(out)]
    assert main(args + ["--resume", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["reused_shards"]) == 1
    assert main(args) == 2  # exists, non-empty
    assert main(args + ["--force"]) == 0


def test_max_memory_and_device_checked_up_front(fx, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="max-memory"):
        merge(fx, out=str(out), max_memory="10KB")
    assert not out.exists() and not (tmp_path / ".out.regmean-partial").exists()
    merge(fx, out=str(out), max_memory="1GB")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(MergeError, match="CUDA is not available"):
            merge(fx, out=str(tmp_path / "o2"), device="cuda")
    with pytest.raises(MergeError, match="device must be"):
        merge(fx, out=str(tmp_path / "o2"), device="tpu")


def test_cli_ctrl_c_says_how_to_resume(fx, tmp_path, capsys, monkeypatch):
    """Ctrl-C during `merge`: exit status 130 and one line naming --resume (no traceback), no output
    folder, and the same command with --resume finishes it bit-identically."""
    from regmean_fast.io import shards

    ref = tmp_path / "ref"
    merge(fx, out=str(ref))
    out = tmp_path / "out"
    args = ["merge", "--models", *[m["model"] for m in fx["models"]], "--grams",
            *[m["grams"] for m in fx["models"]], "--alpha", "0.9", "--shard-size", "12KB", "--out", str(out)]
    real, calls = shards.ShardedOutput._save_manifest, []

    def ctrl_c_after_two_shards(self):  # saved when created, then after each finished shard
        calls.append(1)
        real(self)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(shards.ShardedOutput, "_save_manifest", ctrl_c_after_two_shards)
    capsys.readouterr()
    try:
        rc = main(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the merge command as a traceback")
    assert rc == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err and "--resume" in err, err
    assert not out.exists() and (tmp_path / ".out.regmean-partial").is_dir()
    monkeypatch.setattr(shards.ShardedOutput, "_save_manifest", real)
    assert main(args + ["--resume", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["reused_shards"]) == 2
    assert _files(out) == _files(ref)


def test_python_merge_takes_method_parameters_as_keywords(fx, tmp_path):
    """regmean_fast.merge(config, out, alpha=...) as merge_state_dicts(..., alpha=...): the same as the
    parameter in the configuration; an unknown keyword is the method's one-line error."""
    a, b = tmp_path / "a", tmp_path / "b"
    rep = merge(fx, out=str(a), alpha=0.3)
    merge(dict(fx, parameters={"alpha": 0.3}), out=str(b))
    assert rep["parameters"]["alpha"] == 0.3 and _files(a) == _files(b)
    with pytest.raises(MergeError, match="unknown parameter.*alhpa"):
        merge(fx, out=str(tmp_path / "c"), alhpa=0.3)
    assert not (tmp_path / "c").exists() and not (tmp_path / ".c.regmean-partial").exists()


def test_interrupted_while_replacing_the_output_is_resumable(fx, tmp_path, monkeypatch):
    """--force replaces OUT with two renames; a kill between them leaves no OUT, so the partial folder
    must still be resumable (its manifest kept until the rename): --resume then puts the merge in place."""
    ref = tmp_path / "ref"
    merge(fx, out=str(ref))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    real, calls = os.rename, []

    def killed_between(src, dst):
        calls.append((src, dst))
        if str(src).endswith(".regmean-partial"):
            raise Stop()
        return real(src, dst)

    monkeypatch.setattr(os, "rename", killed_between)
    with pytest.raises(KeyboardInterrupt):
        merge(fx, out=str(out), force=True)
    monkeypatch.setattr(os, "rename", real)
    assert not out.exists() and len(calls) == 2
    rep = merge(fx, out=str(out), resume=True)
    assert len(rep["reused_shards"]) == len(rep["shards"]) > 1
    assert _files(out) == _files(ref) and not (out / "regmean-manifest.json").exists()


def test_resume_with_nothing_or_everything_done(fx, tmp_path, capsys):
    """--resume with nothing to resume from starts afresh (a note); on a finished folder of the same merge it
    is a note and exit 0 with nothing rewritten; on a folder of another merge, one line and nothing touched."""
    out = tmp_path / "out"
    args = ["merge", "--models", *[m["model"] for m in fx["models"]], "--grams",
            *[m["grams"] for m in fx["models"]], "--alpha", "0.9", "--shard-size", "12KB", "--out", str(out)]
    ref = tmp_path / "ref"
    merge(fx, out=str(ref))
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    err = capsys.readouterr().err.strip()
    assert err == f"regmean_fast: note: --resume: nothing to resume from (no {tmp_path / '.out.regmean-partial'}); " \
        "starting from the beginning", err
    assert _files(out) == _files(ref)
    stamps = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    (out / "regmean-manifest.json").write_text("{}")  # as a kill between the final rename and its removal leaves
    assert main(args + ["--resume"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.strip() == (f"regmean_fast: note: --resume: {out} is complete and was made "
                                                 "by this command; nothing to do"), cap.err
    assert {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)} == stamps  # the manifest gone, nothing else
    assert main(args + ["--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["already_complete"] is True
    assert main(args[:-4] + ["--alpha", "0.5", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"regmean_fast: error: --resume: {out} exists but was made by another merge (other inputs or " \
        "settings) (pass --force to replace it, or choose another output)", err
    os.remove(out / sorted(f for f in os.listdir(out) if f.startswith("model-"))[1])  # a user's slip
    assert main(args + ["--resume"]) == 2
    assert "is missing or not the size merge_report.json records" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(args[:-1] + [str(foreign), "--resume"]) == 2
    assert "exists but holds no merge_report.json" in capsys.readouterr().err
    assert os.listdir(foreign) == ["notes.txt"]


def test_a_dare_merge_of_another_generator_is_another_merge(fx, tmp_path, capsys, monkeypatch):
    """The masks' generator is part of what made a dare folder: a folder whose masks another build drew is not
    "complete and made by this command" (--resume refuses it rather than keep masks this build would not draw)."""
    from regmean_fast.merge.methods import METHODS

    out = tmp_path / "out"
    models = [m["model"] for m in fx["models"]]
    args = ["merge", "--method", "dare_linear", "--base-model", models[0], "--models", *models[1:], "--density",
            "0.5", "--seed", "3", "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    monkeypatch.setattr(METHODS["dare_linear"], "draws", "another generator")
    assert main(args + ["--resume"]) == 2
    assert "was made by another merge" in capsys.readouterr().err
