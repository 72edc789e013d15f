"""The input formats `pipeline embed` (and `trainers clip --data`) read, by file extension. Adding one is
its module (a `Reader`: inputs/reader.py) and one line here."""

from __future__ import annotations

from inputs.image_file import IMAGE_FILES
from inputs.parquet import PARQUET
from inputs.reader import Reader
from inputs.tar import TARS

READERS: tuple[Reader, ...] = (IMAGE_FILES, TARS, PARQUET)


def reader_of(kind: str) -> Reader:
    found = next((r for r in READERS if r.kind == kind), None)
    if found is None:
        raise ValueError(f"unknown unit kind {kind}")
    return found


def reader_for(suffix: str) -> Reader | None:
    """The reader claiming a file suffix (lower-case, with its dot), if any."""
    return next((r for r in READERS if suffix in r.extensions), None)
