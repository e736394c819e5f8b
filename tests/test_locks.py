"""segjax.locks: exclusive file locks between processes, and where they step aside."""

from __future__ import annotations

import errno
import os

import pytest

from segjax import locks
from segjax.errors import BusyError


def test_second_holder_is_refused_naming_the_first(tmp_path):
    path = str(tmp_path / "sub" / "x.lock")  # the folder is made too
    with locks.held(path, wait=False, what="thing", hint="; try later"):
        with pytest.raises(BusyError, match=rf"thing is in use by pid {os.getpid()} since .*; try later$"):
            with locks.held(path, wait=False, what="thing", hint="; try later"):
                pass
    with locks.held(path, wait=False):  # released on exit
        pass


def test_urls_are_not_locked(tmp_path, monkeypatch):
    """`gs://...` is not a local file: nothing is created (no local `gs:` folder)."""
    monkeypatch.chdir(tmp_path)
    with locks.held("gs://bucket/run/.lock", wait=False), locks.held("gs://bucket/run/.lock", wait=False):
        pass
    assert os.listdir(tmp_path) == []


def test_filesystems_without_locks_go_on_unguarded(tmp_path, monkeypatch):
    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    entered = []
    with locks.held(str(tmp_path / "x.lock"), wait=False):
        entered.append(True)
    assert entered == [True]
