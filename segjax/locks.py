"""Advisory file locks that keep processes on one machine off each other's files.

Two places need them: a dataset being prepared (TFDS fails in the second of two processes that
write it at once) and a run's workdir (two trainers in one folder would interleave their
checkpoints and logs). `fcntl.flock` locks belong to an open file and vanish with the process,
so a crashed run never leaves a stale lock behind. The lock file holds the holder's pid and
start time, for the message the next process shows, and `holder` tells (on Linux) whether a
process holds a lock without taking it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from absl import logging

from segjax.errors import BusyError


@contextlib.contextmanager
def held(path: str, wait: bool = True, what: str = "", hint: str = "", note: str = ""):
    """Hold an exclusive lock on the file `path` (created, with its folder, if needed).

    `wait=True` blocks until the holder lets go (logging once that it waits); `wait=False` raises
    BusyError at once, naming `what`, the holder and `hint`. Where the file cannot be made (a
    read-only folder), on object storage (a `gs://...` dataset folder) and on filesystems without
    locks nothing is locked: the caller goes on unguarded, as it would without this module.
    `note` (what the holder does) follows the holder's pid and start time in the lock file, for
    `holder` and the messages of the processes kept waiting."""
    if "://" in path:
        yield
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # closed by the `with` below
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not wait:
                raise BusyError(f"{what or path} is in use by {holder} (lock file {path}){hint}") from None
            logging.info("waiting for %s to release %s (%s)", holder, what or path, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # e.g. a network mount without lock support
            logging.warning("cannot lock %s (%s); going on without a lock", path, err)
            yield
            return
        handle.seek(0)
        handle.truncate()
        doing = f", {note}" if note else ""
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}{doing}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def holder(path: str) -> str | None:
    """Who holds the lock on `path` now, by a process on this machine: the lock file's text ("pid N
    since T"), or None when no process here holds it. Read from Linux's /proc/locks, so nothing is
    locked, not even for a moment (a probe with `flock` could make a starting trainer's
    non-blocking lock fail). None too where it cannot be told: no /proc/locks (another OS), a
    missing file, or a holder on another host of a shared filesystem."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii") as f:
            table = f.read()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 1645 fe:00:2146621 0 EOF": major and minor in hex, the inode in
    # decimal; "1: -> FLOCK ..." lines are processes waiting for the lock, not holding it.
    this_file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == this_file:
            try:
                with open(path, encoding="utf-8") as f:
                    return f.read().strip() or f"pid {fields[4]}"
            except OSError:
                return f"pid {fields[4]}"
    return None
