"""Cache files that cannot be written or read, as one-line errors that name the file and the fix.

`CacheFault` is what the commands print as one line with exit code 2 (like `ConfigError`), never a
traceback: `DiskFull` when a write hits ENOSPC or a quota, `Unreadable` when a committed file does not
decode. Both subclasses keep only their message in `args`, so they pickle through Dask unchanged.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
VERIFY_FIX = (
    "run `pipeline run --cache {cache} --verify`, which re-hashes every output and remakes damaged ones"
)


class CacheFault(Exception):
    """A cache file cannot be written or read; the message names it and what to do."""


class DiskFull(CacheFault):
    """A write ran out of space (ENOSPC or EDQUOT); nothing partial was left behind."""

    def __init__(self, message: str, written: int = 0):
        super().__init__(message, written)  # both in args: they survive pickling (Dask)
        self.written = written

    def __str__(self) -> str:
        return self.args[0]


class Unreadable(CacheFault):
    """A file the pipeline or a trainer reads is damaged or not what it should be."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> int | None:
    """Free space on the file system holding `path` (its nearest existing parent), or None."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def disk_full(path: Path, written: int) -> DiskFull:
    """The error for a write of `path` that filled the disk after `written` bytes."""
    free = free_bytes(Path(path).parent)
    where = f"{human_bytes(free)} free there" if free is not None else "free space unknown"
    return DiskFull(
        f"no space left on device writing {path} (it filled after {human_bytes(written)}; {where}); "
        "free space and rerun: the partial file was removed and committed work is kept",
        written,
    )


def with_space_needed(error: DiskFull, cache: Path, shard_sizes: list[int], shards_left: int) -> DiskFull:
    """The same error, naming the cache and about how much more space its unfinished shards need.

    `shard_sizes` are the output bytes of shards already committed (this run's, else the stage's);
    without any, the bytes the failed write got to are a lower bound per shard.
    """
    if shard_sizes:
        need = f"about {human_bytes(sum(shard_sizes) / len(shard_sizes) * shards_left)}"
    else:
        need = f"at least {human_bytes(error.written * shards_left)}"
    return DiskFull(
        f"cache {cache}: {error}. The {shards_left:,} unfinished shard(s) need {need}", error.written
    )


def read_json(path: Path, fix: str) -> Any:
    """Parse a JSON file; damaged bytes give `Unreadable` naming the file and `fix`.

    FileNotFoundError passes through: a missing file usually has a meaning of its own.
    """
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Unreadable(f"{path}: not valid JSON ({_short(e)}); {fix}") from None


def remake_shard_fix(cache: Path, stage: str, shard: int) -> str:
    """The fix for a damaged side file of one shard that its manifest does not list (stats)."""
    return (
        f"delete it and {Path(cache) / stage / '_manifests' / f'{shard:05d}.json'}, then rerun "
        f"`pipeline run --cache {cache}`: that shard alone is remade"
    )


def damaged(path: Path, error: BaseException, cache: Path) -> Unreadable:
    """The error for a committed cache file that fails to decode (bit rot, a truncated copy)."""
    return Unreadable(f"{path}: cannot be decoded ({_short(error)}); {VERIFY_FIX.format(cache=cache)}")


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:160]
