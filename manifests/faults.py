"""Fault injection for crash tests: SIGKILL this process at a named point.

`PIPELINE_CRASH_AT=embed:00001:before_manifest` (an fnmatch pattern) kills the process right there, the
way a node failure would, so tests can check that every such instant leaves a valid cache. Points:
`{stage}:{shard:05d}:before_manifest` (outputs committed, manifest not yet) and
`write:{file name}:before_replace` (temp file complete, not yet renamed). Unset, it costs one dict
lookup per commit. With `PIPELINE_CRASH_ONCE=FILE` too, only the first process to get there dies
(it creates FILE first), so a retried task then succeeds: that is how a worker failure is simulated.

`PIPELINE_ENOSPC_AT=embed/00001.*` (an fnmatch pattern matched against the end of the file's path) makes
that atomic write fail with ENOSPC once its bytes are written, the way a full disk does, for machines
where tests cannot mount a small tmpfs.

`PIPELINE_STALL_AT=embed:decode` (an fnmatch pattern) makes the process sleep `PIPELINE_STALL_S` seconds
(default 60) there, the way a worker stuck on a huge image does, so tests can kill a command while its
workers are busy; it says so on stderr first (`stalled at NAME in PID`). Points: `embed:decode` (a
decode worker, per sample), `trainers:load` (a loader worker, per batch).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
import sys
import time

ENV = "PIPELINE_CRASH_AT"
ONCE_ENV = "PIPELINE_CRASH_ONCE"
ENOSPC_ENV = "PIPELINE_ENOSPC_AT"
STALL_ENV = "PIPELINE_STALL_AT"
STALL_S_ENV = "PIPELINE_STALL_S"


def crash_point(name: str) -> None:
    pattern = os.environ.get(ENV)
    if not pattern or not fnmatch.fnmatchcase(name, pattern):
        return
    marker = os.environ.get(ONCE_ENV)
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # somebody already crashed here once
    os.kill(os.getpid(), signal.SIGKILL)


def disk_full_point(path: str) -> None:
    pattern = os.environ.get(ENOSPC_ENV)
    if pattern and fnmatch.fnmatchcase(path, f"*{pattern}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def stall_point(name: str) -> None:
    pattern = os.environ.get(STALL_ENV)
    if pattern and fnmatch.fnmatchcase(name, pattern):
        # one write of the whole line: print's text and newline are two, which two workers interleaved
        # ("stalled at X in 1stalled at X in 2\n\n")
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), f"stalled at {name} in {os.getpid()}\n".encode())
        time.sleep(float(os.environ.get(STALL_S_ENV, "60")))
