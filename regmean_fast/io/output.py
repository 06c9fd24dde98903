"""The output transaction of both jobs: an output is written into a temporary sibling and put in place whole.

    tx = OutputTransaction(final, tmp, resumable=..., user_error=..., old_suffix=..., kill_prefix=...)
    with tx:                    # on an exception: the cleanup rule below, then the (mapped) error goes on
        tx.start_partial(...)   # a resumable partial folder: kept, emptied or created (io.resume's rule)
        ... write into tx.tmp (tx.writer: what to abort when stopped) ...
        tx.publish()            # fsync, an existing output set aside, one rename, the old one removed

The cleanup rule, one for every job: a user error (the job's user_error says which, and how it reads) removes
what this run created, so nothing is left behind; an interruption, a kill or another rank's failure keeps a
resumable temporary for --resume (a statistics job's temporary is not resumable: its checkpoint is) and
removes one that is not. A kill at any moment leaves either the earlier output or the new one at `final`.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil

from .resume import FRESH, DONE, Found, ResumeError, kill_point, resume_action
from .shards import MANIFEST_GLOB, manifests_mismatch, read_manifests

NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class OutputError(ValueError):
    """The output location or what an earlier run left there is the user's to fix; one line."""


def fsync_dir(path: str) -> None:
    """Make a folder's entries (new files, renames) durable; best effort (some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def free_space_shortfall(folder: str, needed: int) -> str | None:
    """None when `needed` bytes fit in `folder`'s file system, else the one-line reason."""
    free = shutil.disk_usage(folder).free
    if needed <= free:
        return None
    return (f"not enough free disk space for the output in {folder}: "
            f"need {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")


class OutputTransaction:
    """`final` written as `tmp` (a sibling on the same file system), then renamed into place.

    resumable: an interrupted run's `tmp` is what --resume continues from (kept), else it is removed.
    user_error(exc) -> the error the user sees (exc itself, or a one-line replacement), or None when exc is
    not the user's to fix (an interruption, a kill, another rank's failure, a bug).
    old_suffix: an output already at `final` (--force) is renamed to final + old_suffix + pid, then removed.
    set_aside_links: a symbolic link to a folder at `final` is set aside too (else the rename meets it as is).
    on_failure(exc): called first on any exception (torchrun: the other ranks stop writing before anything
    is removed here). kill_prefix names the tests' kill points (io.resume.kill_point)."""

    def __init__(self, final: str, tmp: str, *, resumable: bool, user_error, old_suffix: str,
                 kill_prefix: str, created: bool = False, set_aside_links: bool = False, on_failure=None):
        self.final, self.tmp = final, tmp
        self.resumable, self.user_error, self.on_failure = resumable, user_error, on_failure
        self.old_suffix, self.kill_prefix, self.set_aside_links = old_suffix, kill_prefix, set_aside_links
        self.created = created  # this run made `tmp` (only then may a user error remove it)
        self.writer = None  # what is writing into `tmp` now: .abort() when stopped

    def _kill_point(self, what: str) -> None:
        kill_point(f"{self.kill_prefix}.{what}")

    # -- the cleanup rule ------------------------------------------------------------------------
    def __enter__(self) -> "OutputTransaction":
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is None:
            return False
        if self.on_failure is not None:
            self.on_failure(exc)
        if self.writer is not None:
            self.writer.abort()
        seen = self.user_error(exc)
        if seen is not None or not self.resumable:
            self.discard()
        if seen is not None and seen is not exc:
            raise seen from None
        return False

    def discard(self) -> None:
        """Remove the temporary, when this run created it."""
        if self.created and os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- a resumable partial folder --------------------------------------------------------------
    def start_partial(self, signature: str, resume: bool, force: bool, found_output, note) -> str:
        """Before any work (rank 0): what this run starts from, given what an earlier run left -> FRESH,
        CONTINUE or DONE (io.resume's rule). The partial folder records its signature in manifests (io.shards);
        kept to continue, emptied to start afresh, created when absent. found_output() -> Found | None: the
        output at `final` as the job sees it (only asked with --resume); note(line) prints a note."""
        tmp, partial = self.tmp, None
        if os.path.exists(tmp):
            mans = read_manifests(tmp)
            if mans:
                partial = Found(tmp, manifests_mismatch(mans, signature, tmp))
            elif all(f.startswith("regmean-manifest") for f in os.listdir(tmp)):
                shutil.rmtree(tmp)  # killed before its first manifest was written: nothing in it to keep
            else:
                raise OutputError(f"{tmp} exists and was not made by regmean_fast; remove it")
        action = FRESH
        if resume:
            try:
                action, line = resume_action(found_output(), partial, tmp, force)
            except ResumeError as e:
                raise OutputError(str(e)) from None
            if line:
                note(line)
        if action == DONE:
            self.tidy()
            if partial is not None and partial.matches:  # a stale copy of the same output
                shutil.rmtree(tmp, ignore_errors=True)
            return action
        if action == FRESH and os.path.exists(tmp):
            shutil.rmtree(tmp)
        if not os.path.exists(tmp):
            try:
                os.mkdir(tmp)
            except OSError as e:  # read-only, no permission: the user's to fix, before any work
                raise OutputError(f"cannot write the output in {os.path.dirname(self.final)}: {e.strerror or e}") \
                    from None
            self.created = True
            self._kill_point("partial-created")
        return action

    # -- putting it in place ---------------------------------------------------------------------
    def _rename_into_place(self, src: str, dst: str) -> None:
        """src -> dst by rename; a folder at dst is set aside first and removed after. A kill between the two
        renames leaves nothing at dst and src (a resumable temporary: manifest and all)."""
        old = None
        if os.path.isdir(dst) and (self.set_aside_links or not os.path.islink(dst)):
            old = dst + f"{self.old_suffix}{os.getpid()}"
            os.rename(dst, old)
            self._kill_point("swapping")
        os.rename(src, dst)  # over nothing (or, POSIX, a plain file); the OS refuses anything else
        self._kill_point("renamed")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def place(self, name: str) -> str:
        """One file of the temporary folder into `final`'s folder (an output of several files beside others,
        placed one by one, the file that names the output last) -> its path there."""
        dst = os.path.join(os.path.dirname(self.final), name)
        self._rename_into_place(os.path.join(self.tmp, name), dst)
        return dst

    def publish(self) -> None:
        """The temporary folder becomes `final` by one rename (an earlier output there is set aside first)."""
        final = self.final
        fsync_dir(self.tmp)
        self._kill_point("finalised")
        self._rename_into_place(self.tmp, final)
        self.tidy()
        fsync_dir(final)
        fsync_dir(os.path.dirname(final) or ".")
        self._kill_point("finished")

    def tidy(self) -> None:
        """The output is in place: drop the manifests it was written with and any earlier output set aside
        (also when a kill came between the renames and here)."""
        if not self.resumable:
            return
        for man in glob.glob(os.path.join(glob.escape(self.final), MANIFEST_GLOB)):
            os.remove(man)
        for old in glob.glob(glob.escape(self.final) + self.old_suffix + "*"):
            shutil.rmtree(old, ignore_errors=True)
