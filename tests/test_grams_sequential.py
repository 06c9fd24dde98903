import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

from regmean_fast import load_grams  # noqa: E402
from regmean_fast.cli import main  # noqa: E402
from regmean_fast.grams.checkpoint import checkpoint_path  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    f = root / "d.txt"
    f.write_text("\n".join(hf_tiny.random_texts(9, seed=5)) + "\n")
    return root, str(f)


def _grams(capsys, model_dir, data, out, *extra):
    rc = main(["grams", str(model_dir), "--data", data, "--out", str(out), "--batch-size", "4", "--no-progress",
               *map(str, extra)])
    err = capsys.readouterr().err
    assert rc == 0, err
    return load_grams(out, verify=True), err


@pytest.mark.parametrize("kind,dtype", [("llama", None), ("qwen2", None), ("gemma3", None),
                                         ("gemma3", torch.bfloat16)], ids=["llama", "qwen2", "gemma3", "gemma3-bf16"])
def test_sequential_equals_whole_model(kind, dtype, data, tmp_path, capsys):
    """A bf16 checkpoint (as real LLMs ship) run in fp32: the buffers no checkpoint holds (Gemma-3's
    embed_scale) must be fp32 in both modes, not rounded to the config's bf16 in one of them."""
    root, d = data
    m = hf_tiny.save_tiny(tmp_path / kind, kind, max_shard_size="20KB", dtype=dtype)  # sharded checkpoint
    whole, _ = _grams(capsys, m, d, tmp_path / "whole.safetensors")
    seq, _ = _grams(capsys, m, d, tmp_path / "seq.safetensors", "--sequential")
    assert seq.modules() == whole.modules() and seq.groups() == whole.groups()
    assert seq.metadata["mode"] == "sequential" and seq.metadata["tokens"] == whole.metadata["tokens"]
    assert seq.metadata["examples"] == whole.metadata["examples"] == 9
    for k in whole.keys():
        assert seq.count(k) == whole.count(k), k
        torch.testing.assert_close(seq.gram(k), whole.gram(k), rtol=1e-5, atol=1e-5)
    # a tied LM head is the embedding matrix, averaged with it: no Gram of its own (Gemma-3 ties, the others not)
    assert ("lm_head" in seq.modules()) == (not hf_tiny.make_config(kind).tie_word_embeddings)


def test_sequential_padding_included(data, tmp_path, capsys):
    root, d = data
    m = hf_tiny.save_tiny(tmp_path / "llama", "llama")
    whole, _ = _grams(capsys, m, d, tmp_path / "w.safetensors", "--include-padding")
    seq, _ = _grams(capsys, m, d, tmp_path / "s.safetensors", "--include-padding", "--sequential")
    for k in whole.keys():
        assert seq.count(k) == whole.count(k)
        torch.testing.assert_close(seq.gram(k), whole.gram(k), rtol=1e-5, atol=1e-5)


def test_sequential_falls_back(data, tmp_path, capsys):
    root, d = data
    m = hf_tiny.save_tiny(tmp_path / "gpt2", "gpt2")
    gs, err = _grams(capsys, m, d, tmp_path / "g.safetensors", "--sequential")
    assert "not available for this model" in err and gs.metadata["mode"] == "whole-model"


# ---- checkpoints and --resume in sequential mode (3 batches x (2 blocks + the head) = 9 steps)

@pytest.fixture(scope="module")
def llama_runs(data, tmp_path_factory):
    """A tiny Llama, its uninterrupted sequential file and its whole-model file."""
    root, d = data
    tmp = tmp_path_factory.mktemp("seq-resume")
    m = hf_tiny.save_tiny(tmp / "llama", "llama", max_shard_size="20KB")
    files = {}
    for mode, extra in (("seq", ["--sequential"]), ("whole", [])):
        files[mode] = tmp / f"{mode}.safetensors"
        assert main(["grams", m, "--data", d, "--out", str(files[mode]), "--batch-size", "4", "--no-progress",
                     *extra]) == 0
    return m, d, files


def _seq(capsys, m, d, out, *extra):
    rc = main(["grams", str(m), "--data", d, "--out", str(out), "--batch-size", "4", "--no-progress", "--sequential",
               *map(str, extra)])
    return rc, capsys.readouterr().err


def _assert_same_file(a, b, whole):
    assert open(a, "rb").read() == open(b, "rb").read()
    gs, ref = load_grams(b, verify=True), load_grams(whole)
    for k in ref.keys():
        assert gs.count(k) == ref.count(k), k
        torch.testing.assert_close(gs.gram(k), ref.gram(k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_sequential_resume_identical(device, llama_runs, tmp_path, capsys, monkeypatch):
    """Stopped mid-block and resumed (on CUDA the resumed block's Grams go back to the device)."""
    m, d, files = llama_runs
    out = tmp_path / "part.safetensors"
    ckpt = checkpoint_path(str(out))
    full = files["seq"]
    if device != "cpu":
        full = tmp_path / "full.safetensors"
        assert _seq(capsys, m, d, full, "--device", device)[0] == 0
    # stops mid block 0 (after 2 steps), mid block 1 (2 more), in the head (4 more), then finishes
    for after, where in ((2, "decoder block 1 of 2, batch 3 of 3"), (2, "decoder block 2 of 2, batch 2 of 3"),
                         (4, "the final norm and LM head, batch 3 of 3")):
        monkeypatch.setenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER", str(after))
        rc, err = _seq(capsys, m, d, out, "--device", device, *(["--resume"] if os.path.exists(ckpt) else []))
        assert rc == 130 and f"interrupted before {where}" in err and "--resume" in err, err
        assert os.path.exists(ckpt) and not os.path.exists(out)
    monkeypatch.delenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER")
    rc, err = _seq(capsys, m, d, out, "--device", device, "--resume")
    assert rc == 0 and "resuming from" in err, err
    assert not os.path.exists(ckpt)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    _assert_same_file(full, out, files["whole"])


def test_sequential_ctrl_c_then_resume(llama_runs, tmp_path, capsys, monkeypatch):
    """A real SIGINT while block 2 is being loaded: 130, a checkpoint at that block, how to resume."""
    import signal

    from regmean_fast.grams import sequential as S

    m, d, files = llama_runs
    out = tmp_path / "part.safetensors"
    real = S._materialize

    def ctrl_c_at_block_2(module, prefix, *a):
        if prefix == "model.layers.1":
            signal.raise_signal(signal.SIGINT)
        return real(module, prefix, *a)

    monkeypatch.setattr(S, "_materialize", ctrl_c_at_block_2)
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    rc, err = _seq(capsys, m, d, out)
    assert rc == 130 and "interrupted; finishing the current batch" in err
    assert "interrupted before decoder block 2 of 2, batch 1 of 3" in err and "same command plus --resume" in err
    assert not os.path.exists(out) and os.path.exists(checkpoint_path(str(out)))
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is given back
    monkeypatch.setattr(S, "_materialize", real)
    rc, err = _seq(capsys, m, d, out, "--resume")
    assert rc == 0, err
    _assert_same_file(files["seq"], out, files["whole"])


def test_sequential_crash_resumes_from_periodic_checkpoint(llama_runs, tmp_path, capsys, monkeypatch):
    """An error in block 2 with --checkpoint-every 1: the checkpoint written after block 1 resumes."""
    from regmean_fast.grams import sequential as S

    m, d, files = llama_runs
    out = tmp_path / "part.safetensors"
    ckpt = checkpoint_path(str(out))
    real = S._materialize
    seen = []

    def fail_at_block_2(module, prefix, *a):
        if prefix == "model.layers.1":
            seen.append(os.path.exists(ckpt))
            raise RuntimeError("simulated crash")
        return real(module, prefix, *a)

    monkeypatch.setattr(S, "_materialize", fail_at_block_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _seq(capsys, m, d, out, "--checkpoint-every", 1)
    assert seen == [True] and not os.path.exists(out)
    monkeypatch.setattr(S, "_materialize", real)
    rc, err = _seq(capsys, m, d, out, "--resume", "--checkpoint-every", 1)
    assert rc == 0 and "resuming from" in err and "at decoder block 2 of 2, batch 1 of 3" in err, err
    _assert_same_file(files["seq"], out, files["whole"])


def test_sequential_resume_refuses_other_runs(llama_runs, tmp_path, capsys, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import save_file

    m, d, files = llama_runs
    out = tmp_path / "part.safetensors"
    ckpt = checkpoint_path(str(out))
    monkeypatch.setenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER", "4")
    assert _seq(capsys, m, d, out)[0] == 130
    monkeypatch.delenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER")

    def refused(argv, what):
        before = open(ckpt, "rb").read()
        rc = main(["grams", str(m), "--data", d, "--out", str(out), "--batch-size", "4", "--no-progress",
                   "--resume", *map(str, argv)])
        err = capsys.readouterr().err
        assert rc == 2 and what in err and len(err.strip().splitlines()) == 1, err
        assert not os.path.exists(out) and open(ckpt, "rb").read() == before  # nothing written, nothing lost

    refused(["--sequential", "--max-examples", 5], "another model, data or settings")
    refused(["--sequential", "--dtype", "bf16"], "another model, data or settings")
    refused([], "another model, data or settings")  # whole-model mode does not take it

    with safe_open(ckpt, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, ckpt, metadata=dict(meta, version="0"))
    refused(["--sequential"], "not a version-1 regmean_fast grams checkpoint")
    save_file({k: v for k, v in tensors.items() if k != "hidden.2"}, ckpt, metadata=meta)
    refused(["--sequential"], "hidden states of batch 2: missing")
    save_file(dict(tensors, **{"hidden.0": tensors["hidden.0"][:, :-1].contiguous()}), ckpt, metadata=meta)
    refused(["--sequential"], "hidden states of batch 0")


def test_sequential_finished_blocks_leave_memory(llama_runs, tmp_path, capsys, monkeypatch):
    """A finished block's Grams go to a work file beside the checkpoint (memory and checkpoints hold the current
    block's only); a resumed run reads them back only if this run wrote them; the work folder goes at the end."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from regmean_fast.grams.checkpoint import work_folder

    m, d, files = llama_runs
    out = tmp_path / "part.safetensors"
    ckpt = checkpoint_path(str(out))
    part0 = os.path.join(work_folder(ckpt), "part-00000.safetensors")
    monkeypatch.setenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER", "4")  # block 0 (3 batches) done, 1 batch of block 1
    assert _seq(capsys, m, d, out)[0] == 130
    monkeypatch.delenv("REGMEAN_FAST_GRAMS_INTERRUPT_AFTER")
    with safe_open(ckpt, "pt") as f:
        keys, state = list(f.keys()), json.loads(f.metadata()["state"])
    grams_kept = [k for k in keys if k.startswith("gram.")]
    assert grams_kept and all(k.startswith("gram.model.layers.1.") for k in grams_kept), grams_kept
    assert state["spilled"] and all(k.startswith("model.layers.0.") and path == part0
                                    for k, (path, *_) in state["spilled"].items()), state["spilled"]
    ref = load_grams(files["whole"])
    with safe_open(part0, "pt") as f:  # the raw sums, upper triangle valid, as the Gram file will store them
        for k in f.keys():
            G = f.get_tensor(k).double()
            torch.testing.assert_close(torch.triu(G), torch.triu(ref.raw_gram(k).double()), rtol=1e-5, atol=1e-5)
        spilled = {k: f.get_tensor(k) for k in f.keys()}
    before = open(ckpt, "rb").read()

    def refused(what):
        rc, err = _seq(capsys, m, d, out, "--resume")
        assert rc == 2 and what in err and len(err.strip().splitlines()) == 1, err
        assert not os.path.exists(out) and open(ckpt, "rb").read() == before

    save_file(spilled, part0, metadata={"signature": "another run"})
    refused("was written by another run")
    os.remove(part0)
    refused("missing or changed")
    save_file(spilled, part0, metadata={"signature": _ckpt_signature(ckpt)})  # put back
    rc, err = _seq(capsys, m, d, out, "--resume")
    assert rc == 0 and "resuming from" in err, err
    assert not os.path.exists(ckpt) and not os.path.exists(work_folder(ckpt))
    _assert_same_file(files["seq"], out, files["whole"])


def _ckpt_signature(ckpt):
    from safetensors import safe_open

    with safe_open(ckpt, "pt") as f:
        return f.metadata()["signature"]


def test_sequential_work_file_unwritable(llama_runs, tmp_path, capsys, monkeypatch):
    """A full disk while a finished block's Grams are written out: one line, exit 2, no file and no work folder."""
    import errno

    from regmean_fast.grams import fileformat
    from regmean_fast.grams.checkpoint import work_folder

    m, d, _ = llama_runs
    out = tmp_path / "g.safetensors"

    def disk_full(fname, *a, **k):
        open(fname, "wb").close()  # the temporary file it began
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileformat, "write_safetensors", disk_full)
    rc, err = _seq(capsys, m, d, out)
    assert rc == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == [] and not os.path.exists(work_folder(checkpoint_path(str(out))))
