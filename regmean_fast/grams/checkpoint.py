"""Checkpoints of the statistics job (grams, grams --sequential; next, RegMean++'s blocks): the file beside --out
that an interrupted run leaves, what --resume starts from (io.resume's rule), and Ctrl-C as a request to stop
after the current step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

from ..io.resume import CONTINUE, DONE, Found, ResumeError, kill_point, resume_action
from .fileformat import GramsError

# tests: stop as a Ctrl-C does after N steps of a run (a step: one batch; --sequential: one batch through one part)
_TEST_INTERRUPT_ENV = "REGMEAN_FAST_GRAMS_INTERRUPT_AFTER"
CHECKPOINT_FORMAT = "regmean_fast grams checkpoint"
CHECKPOINT_VERSION = "1"  # bump when the state or the tensors a checkpoint holds change meaning


def checkpoint_path(out: str, rank: int = 0, world: int = 1) -> str:
    """Beside --out; one file per rank under torchrun (OUT.checkpoint.rank1-of-4.safetensors)."""
    tail = f".checkpoint.rank{rank}-of-{world}.safetensors" if world > 1 else ".checkpoint.safetensors"
    return os.path.abspath(out).rstrip(os.sep) + tail


def work_folder(ckpt: str) -> str:
    """Beside the checkpoint, the files it refers to (grams --sequential: finished blocks' Grams)."""
    return ckpt[: -len(".safetensors")] + ".parts"


def remove_work_folder(ckpt: str) -> None:
    import shutil

    shutil.rmtree(work_folder(ckpt), ignore_errors=True)


def output_target(out: str) -> str:
    """The path that stands for the Gram file --out names: X.safetensors, or its index when it is sharded."""
    if out.endswith(".safetensors") and not os.path.exists(out) and os.path.exists(out + ".index.json"):
        return out + ".index.json"
    return out


def write_checkpoint(path: str, collector, signature: str, mode: str, extra: dict | None = None) -> None:
    """Atomically: the collector's state, the run's own position (extra; its "_tensors" become tensors)."""
    from safetensors.torch import save_file

    st = collector.state()
    meta = {k: v for k, v in st.items() if k != "grams"}
    extra = dict(extra or {})
    more = extra.pop("_tensors", {})
    meta.update(extra, mode=mode)
    tmp = f"{path}.tmp-{os.getpid()}"
    tensors = {"gram." + k: G.contiguous() for k, G in st["grams"].items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in more.items()})
    try:
        save_file(tensors, tmp, metadata={"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                          "signature": signature, "state": json.dumps(meta)})
        kill_point("grams.checkpoint-tmp")
        os.replace(tmp, path)
    except BaseException:  # a full disk or a second Ctrl-C: leave the previous checkpoint, not a torso
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_checkpoint(path: str, signature: str, mode: str) -> tuple[dict, dict]:
    """-> (state with "grams", the other tensors); a checkpoint of another run or version is refused."""
    from safetensors import safe_open

    meta = checkpoint_header(path, signature, mode)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise GramsError(f"unreadable checkpoint {path}: {e}") from None
    state = json.loads(meta["state"])
    state["grams"] = {k[5:]: v for k, v in tensors.items() if k.startswith("gram.")}
    others = {k: v for k, v in tensors.items() if not k.startswith("gram.")}
    return state, others


def checkpoint_header(path: str, signature: str, mode: str) -> dict:
    """The checkpoint's metadata, reading no tensor; GramsError when it is not this run's (version, signature,
    mode) or not a checkpoint at all."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise GramsError(f"unreadable checkpoint {path}: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise GramsError(
            f"checkpoint {path} is not a version-{CHECKPOINT_VERSION} regmean_fast grams checkpoint "
            f"(version {meta.get('version', 'none')}); delete it and rerun without --resume"
        )
    if meta.get("signature") != signature:
        raise GramsError(
            f"checkpoint {path} was made with another model, data or settings; rerun with the same command "
            "or delete it"
        )
    try:
        made_in = json.loads(meta["state"]).get("mode")
    except (KeyError, ValueError, AttributeError):
        raise GramsError(f"unreadable checkpoint {path}: no valid state") from None
    if made_in != mode:
        raise GramsError(f"checkpoint {path} is from a {made_in} run, this run is {mode}; "
                         "rerun with the same command or delete it")
    return meta


def start_from(resume: bool, force: bool, out: str, ckpt: str, signature: str, ckpt_signature: str, mode: str,
               dist) -> bool | None:
    """What this run starts from: True the checkpoint, False nothing (always without --resume), None: the Gram
    file is already complete and made by this command (nothing to do; the stale checkpoint is removed).
    Rank 0 judges the one output for every rank (dist); each rank judges its own checkpoint."""
    if not resume:
        return False
    output = dist.judge_output(lambda: _found_output(out, signature))
    partial = None
    if os.path.exists(ckpt):
        try:
            checkpoint_header(ckpt, ckpt_signature, mode)
            partial = Found(ckpt)
        except GramsError as e:
            partial = Found(ckpt, str(e))
    try:
        action, note = resume_action(output, partial, ckpt, force=force)
    except ResumeError as e:
        raise GramsError(str(e)) from None
    if note and (dist.is_main or action != DONE):
        dist.log("note: " + note)
    if action == DONE:
        if partial is not None and partial.matches:
            os.remove(ckpt)
        remove_work_folder(ckpt)  # what a kill after writing left of this command's work
        return None
    return action == CONTINUE


def _found_output(out: str, signature: str):
    """The Gram file at --out as io.resume sees it: None (absent), made by this command or not (and why)."""
    from .fileformat import load_grams

    target = output_target(out)
    if not os.path.lexists(target):
        return None
    try:
        made_by = load_grams(target).metadata.get("signature")
    except Exception as e:  # noqa: BLE001 - anything unreadable is simply not ours
        return Found(target, f"is not a readable Gram file ({str(e).splitlines()[0] if str(e) else e})")
    if made_by != signature:
        return Found(target, "was made with another model, data or settings" if made_by else
                     "records no signature of what made it (an older regmean_fast, or another tool)")
    return Found(target)


class Stop:
    """Ctrl-C (or the test hook) asks the run to stop after its current step; a second Ctrl-C aborts."""

    def __init__(self, step_name: str = "batch"):
        self.step_name = step_name  # what is finished before the checkpoint, for the message
        self.flag = False
        self.steps = 0
        self.after = int(os.environ.get(_TEST_INTERRUPT_ENV, "0") or 0)
        self._old = None

    def step(self) -> None:
        kill_point("grams.step")
        self.steps += 1
        if self.after and self.steps >= self.after:
            self.flag = True

    def _on_sigint(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print(f"\nregmean_fast: interrupted; finishing the current {self.step_name} and saving a checkpoint "
              "(Ctrl-C again to abort without one)", file=sys.stderr)

    def __enter__(self) -> "Stop":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


class PartEndStop:
    """A Stop as a --sequential run under torchrun obeys it: the ranks sum each finished part's Grams together (a
    collective every rank must reach), so a stop asked on any rank (`asked`, a Stop) raises `flag` on every rank
    at the same part end (distribution.Ranks.meet_part), never mid-part."""

    def __init__(self, asked: Stop):
        self.asked = asked
        self.flag = False

    def step(self) -> None:
        self.asked.step()


def save_if_stopped(dist, stop: Stop, finished: bool, save, ckpt: str, where: str) -> bool:
    """After the loop, on every rank: if this rank stopped early (under torchrun: if any rank did: every rank
    saves its checkpoint and stops), save the checkpoint, say how to resume and return True (the command then
    exits with EXIT_INTERRUPTED)."""
    if not dist.any_stopped(stop.flag and not finished):
        return False
    save()
    dist.log(f"interrupted {where}; checkpoint saved to {ckpt}. Resume with the same command plus --resume")
    return True


def remove_checkpoint(ckpt: str) -> None:
    """The Gram file is complete: its checkpoint, and any checkpoint a kill left half-written, go."""
    import glob

    for p in [ckpt] + glob.glob(glob.escape(ckpt) + ".tmp-*"):
        if os.path.exists(p):
            os.remove(p)
    remove_work_folder(ckpt)  # after the checkpoint: a kill in between leaves files, never a dangling checkpoint
    kill_point("grams.finished")
