"""Fault injection for crash tests: SIGKILL this process at a named point.

`PIPELINE_CRASH_AT=embed:00001:before_manifest` (an fnmatch pattern) kills the process right there, the
way a node failure would, so tests can check that every such instant leaves a valid cache. Points:
`{stage}:{shard:05d}:before_manifest` (outputs committed, manifest not yet) and
`write:{file name}:before_replace` (temp file complete, not yet renamed). Unset, it costs one dict
lookup per commit.
"""

from __future__ import annotations

import fnmatch
import os
import signal

ENV = "PIPELINE_CRASH_AT"


def crash_point(name: str) -> None:
    pattern = os.environ.get(ENV)
    if pattern and fnmatch.fnmatchcase(name, pattern):
        os.kill(os.getpid(), signal.SIGKILL)
