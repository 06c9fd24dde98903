"""`--resume`: what a job does with what an earlier run of the same command left behind, one rule for every
job that writes (grams, grams --sequential, merge; under torchrun rank 0 judges the output for every rank).

A run killed at any moment leaves at most two things: its partial state (`partial`: a checkpoint, a partial
folder with its manifest) and its output at the final path (`output`: written last and put in place whole by
a rename, so complete or absent). The job says whether each was made by this very command (both record a
signature of the inputs and settings); this module decides, with --resume:

    output there, made by this command  -> DONE: nothing to do (any partial state is stale)
    output there, made otherwise        -> error, unless --force (then it is replaced at the end)
    no partial state                    -> FRESH: start from the beginning (a note says so)
    partial state made by this command  -> CONTINUE from it
    partial state made otherwise        -> error (the job's own line: which file, why, what to do)

Without --resume an existing output needs --force and any partial state is started over (the job's own
cheap checks, before any work). `kill_point` is the tests' fault-injection hook.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

FRESH, CONTINUE, DONE = "fresh", "continue", "done"
KILL_ENV = "REGMEAN_FAST_KILL_AT"  # tests: "POINT" or "POINT@N": SIGKILL this process the N-th time at POINT


class ResumeError(ValueError):
    """What is there was not made by this command; one line for the user."""


@dataclass(frozen=True)
class Found:
    """Something an earlier run left at `path`; `mismatch` is None when this command made it, else one line why
    not (for an output: a clause after "exists but"; for partial state: the whole message)."""

    path: str
    mismatch: str | None = None

    @property
    def matches(self) -> bool:
        return self.mismatch is None


def resume_action(output: Found | None, partial: Found | None, partial_path: str,
                  force: bool = False) -> tuple[str, str | None]:
    """--resume given what was found -> (FRESH | CONTINUE | DONE, a one-line note or None).
    Raises ResumeError when something there does not match this command."""
    if output is not None:
        if output.matches:
            return DONE, f"--resume: {output.path} is complete and was made by this command; nothing to do"
        if not force:
            raise ResumeError(f"--resume: {output.path} exists but {output.mismatch} "
                              "(pass --force to replace it, or choose another output)")
    if partial is None:
        return FRESH, f"--resume: nothing to resume from (no {partial_path}); starting from the beginning"
    if not partial.matches:
        raise ResumeError(partial.mismatch)
    return CONTINUE, None


_arrivals: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Tests: die here as a SIGKILL (out of memory, a pre-empted node) would, when KILL_ENV names this point;
    nothing is flushed or cleaned up. A no-op otherwise."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, n = spec.partition("@")
    if point != name:
        return
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if _arrivals[name] >= int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
