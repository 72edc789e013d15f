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
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal

ENV = "PIPELINE_CRASH_AT"
ONCE_ENV = "PIPELINE_CRASH_ONCE"
ENOSPC_ENV = "PIPELINE_ENOSPC_AT"


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
