"""Paths that caches and runs record, so every command works from any working directory.

A user-given file argument is recorded absolute (`recorded_path`); tags and names are kept as given.
Caches and checkpoints made before recorded relative paths, relative to where that command ran:
`resolve_recorded` finds such a file again from the working directory, or from the file that
recorded it and its parent folders.
"""

from __future__ import annotations

from pathlib import Path


def recorded_path(arg: str) -> str:
    """`arg` as it should be recorded: absolute when it names an existing file, else unchanged."""
    return str(Path(arg).expanduser().resolve()) if arg and Path(arg).expanduser().is_file() else arg


def resolve_recorded(arg: str, anchor: Path) -> str:
    """A recorded argument as a path that works from here, or `arg` unchanged when it is not a file
    that can be found (a tag, a bundled name, an absolute path, a file that is gone)."""
    if not arg or Path(arg).is_absolute():
        return arg
    anchor = Path(anchor).resolve()
    for base in (Path.cwd(), anchor, *anchor.parents):
        candidate = base / arg
        if candidate.is_file():
            return str(candidate)
    return arg


def absolute(path: Path | str | None) -> str | None:
    """A path to record in a run's config: absolute, so a resume or eval from elsewhere finds it."""
    return None if path is None else str(Path(path).expanduser().resolve())
