"""A cache-wide lock so two commands never write the same cache at once.

Every command that writes a cache's stage outputs (`pipeline run`, `embed`, `retrieve`, `optimize`,
`trainers vae --encode`) holds it for its whole run; a second one waits up to `--wait` seconds or stops
with one line naming the holder. Readers (status, trainers) never take it.

`{cache}/.lock` is locked with `flock`, which the kernel releases when the holder exits or is killed
(SIGKILL included), so a dead run's lock is never stale: the next run simply takes it. The file also
records the holder's pid, host and start time, for the message the second run prints. The file itself
is never deleted (deleting it would race with a process that has just opened it). A cache that cannot be
written (read-only file system, no permission) is `NotWritable` before anything else is done.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from manifests.errors import CacheFault

LOCK_NAME = ".lock"


class LockHeld(CacheFault):
    """Another live run holds the cache."""


NOT_WRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class NotWritable(CacheFault):
    """The cache (or a folder a command writes) is on a read-only file system or not writable by this user."""


def not_writable(folder: Path, error: OSError) -> NotWritable:
    """The one-line error of a command that must write `folder` and cannot (`error`: EROFS, EACCES, EPERM)."""
    where = os.path.abspath(error.filename or folder)
    return NotWritable(
        f"{os.path.abspath(folder)} cannot be written ({error.strerror.lower()}: {where}), and this command "
        "writes it: run it where it is writable. Commands that only read work on a read-only cache "
        "(`pipeline status`, the trainers)"
    )


def read_lock(cache: Path) -> dict:
    try:
        return json.loads((Path(cache) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):  # absent, or bytes a crash or a hand left: only used in a message
        return {}


class CacheLock:
    """`with CacheLock(cache, wait=30):` waits up to `wait` seconds for the holder, then raises LockHeld."""

    def __init__(self, cache: Path, wait: float = 0.0, poll: float = 0.2):
        self.path = Path(cache) / LOCK_NAME
        self.wait, self.poll = wait, poll
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            if e.errno in NOT_WRITABLE_ERRNOS:
                raise not_writable(self.path.parent, e) from None
            raise
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    holder = read_lock(self.path.parent)
                    raise LockHeld(
                        f"cache {self.path.parent} is in use by pid {holder.get('pid', '?')} on "
                        f"{holder.get('host', '?')}; wait for that run to finish or pass --wait SECONDS"
                    ) from None
                time.sleep(self.poll)
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CacheLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
