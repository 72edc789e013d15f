"""An input format, as `pipeline embed` and `trainers clip --data` read it (inputs/registry.py lists them).

A reader claims files by extension and turns one unit (a file of its kind) into raw samples, yielding a
`Skip(reason)` for each bad one so that it is counted, not lost. `keys` lists a unit's sample keys cheaply
(what `read` would yield, without reading the data); `count` is a cheap sample count for a progress bar
(None: `keys` is used, within a time budget); `check` refuses an unusable file when the inputs are
expanded, before any work. Only a reader whose units are single samples (`in_folders`) is picked up when
a folder is scanned; a container's files must be named.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from inputs.units import RawSample, Skip, Unit


def _no_check(unit: Unit) -> None:
    return None


@dataclass(frozen=True)
class Reader:
    kind: str  # the units' kind (part of each unit's id, so of the cache's input digests: never rename)
    extensions: tuple[str, ...]  # lower-case file suffixes it claims
    read: Callable[[Unit], Iterator[RawSample | Skip]]
    keys: Callable[[Unit], list[str]]
    count: Callable[[Unit], int] | None = None
    check: Callable[[Unit], None] = _no_check
    in_folders: bool = False  # one sample per file: picked up when a folder is scanned
