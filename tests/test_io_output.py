"""io.output's transaction on its own: the cleanup rule (user error vs interruption), the rename into place with
--force, and the partial folder judged through io.resume."""

import os

import pytest

from regmean_fast.io.output import OutputError, OutputTransaction
from regmean_fast.io.resume import CONTINUE, DONE, FRESH, Found
from regmean_fast.io.shards import MANIFEST_FORMAT, MANIFEST_NAME


class UserError(ValueError):
    pass


def _tx(tmp_path, resumable=True, created=True):
    final, tmp = str(tmp_path / "out"), str(tmp_path / ".out.partial")
    os.mkdir(tmp)
    return OutputTransaction(final, tmp, resumable=resumable, created=created, old_suffix=".old-", kill_prefix="t",
                             user_error=lambda e: e if isinstance(e, UserError) else (
                                 UserError("full") if isinstance(e, OSError) else None))


def test_user_error_removes_what_the_run_made(tmp_path):
    tx = _tx(tmp_path)
    with pytest.raises(UserError, match="bad"), tx:
        raise UserError("bad")
    assert not os.path.exists(tx.tmp)
    tx = _tx(tmp_path)
    with pytest.raises(UserError, match="full"), tx:  # mapped to the user's line
        raise OSError(28, "No space left on device")
    assert not os.path.exists(tx.tmp)
    tx = _tx(tmp_path, created=False)  # an earlier run's partial folder is not this run's to remove
    with pytest.raises(UserError), tx:
        raise UserError("bad")
    assert os.path.isdir(tx.tmp)


def test_interruption_keeps_only_a_resumable_temporary(tmp_path):
    os.mkdir(tmp_path / "a")
    tx = _tx(tmp_path / "a")
    calls = []
    tx.on_failure = calls.append
    with pytest.raises(KeyboardInterrupt), tx:
        raise KeyboardInterrupt
    assert os.path.isdir(tx.tmp) and len(calls) == 1
    os.mkdir(tmp_path / "b")
    tx = _tx(tmp_path / "b", resumable=False)
    with pytest.raises(KeyboardInterrupt), tx:
        raise KeyboardInterrupt
    assert not os.path.exists(tx.tmp)


def test_publish_sets_the_old_output_aside_and_removes_it(tmp_path):
    tx = _tx(tmp_path)
    os.mkdir(tx.final)
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / ".out.partial" / "new.txt").write_text("new")
    tx.publish()
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tx.final) == ["new.txt"]


def test_start_partial(tmp_path):
    notes = []
    final, tmp = str(tmp_path / "out"), str(tmp_path / ".out.partial")
    tx = OutputTransaction(final, tmp, resumable=True, user_error=lambda e: None, old_suffix=".old-", kill_prefix="t")
    assert tx.start_partial("sig", True, False, lambda: None, notes.append) == FRESH
    assert os.path.isdir(tmp) and tx.created and "nothing to resume from" in notes[0]
    (tmp_path / ".out.partial" / MANIFEST_NAME).write_text(f'{{"format": "{MANIFEST_FORMAT}", "plan_hash": "sig"}}')
    tx = OutputTransaction(final, tmp, resumable=True, user_error=lambda e: None, old_suffix=".old-", kill_prefix="t")
    assert tx.start_partial("sig", True, False, lambda: None, notes.append) == CONTINUE and not tx.created
    with pytest.raises(OutputError, match="different configuration"):
        tx.start_partial("other", True, False, lambda: None, notes.append)
    os.mkdir(final)
    assert tx.start_partial("sig", True, False, lambda: Found(final), notes.append) == DONE
    assert not os.path.exists(tmp)  # the stale copy of the same output goes
    os.mkdir(tmp)
    (tmp_path / ".out.partial" / "mine.txt").write_text("a user's")
    with pytest.raises(OutputError, match="was not made by regmean_fast"):
        tx.start_partial("sig", False, False, lambda: None, notes.append)
