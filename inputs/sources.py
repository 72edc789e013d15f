"""Input sources for `pipeline embed`: the user's INPUT arguments as units, read by the format readers of
inputs/registry.py (folders of images, WebDataset tars, Parquet files, ...).

`expand_inputs` turns INPUT arguments into *units*, the smallest things the shard plan assigns: one image
file, one tar, or one Parquet file. `read_unit` streams raw samples from a unit. Nothing here decodes
images; bad members are yielded as `Skip(reason)` so they are counted, not lost.
"""

from __future__ import annotations

import glob
import os
import posixpath
import time
from collections.abc import Iterator
from pathlib import Path

from core.errors import ConfigError
from inputs import registry
from inputs.units import RawSample, Skip, Unit
from storage import remote


def _expand_braces(pattern: str) -> list[str]:
    if "{" not in pattern:
        return [pattern]
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def _unit_of_file(path: str, name: str) -> Unit | None:
    """The unit of a file (or object) named `name` under its input root, or None for an unclaimed kind."""
    reader = registry.reader_for(posixpath.splitext(path)[1].lower())
    if reader is None:
        return None
    return Unit(reader.kind, path, name if reader.in_folders else posixpath.basename(path))


def _named_file(path: str, shown: str) -> Unit:
    """The unit of a file named as an INPUT (not found in a folder): a ConfigError for an unknown kind or
    an unusable file."""
    unit = _unit_of_file(path, posixpath.basename(path))
    if unit is None:
        known = ", ".join(e for r in registry.READERS for e in r.extensions)
        raise ConfigError(f"input {shown}: unsupported file type; give files of {known}, or folders")
    registry.reader_of(unit.kind).check(unit)
    return unit


def _claimed(name: str) -> bool:
    """Whether a folder scan picks up a file of this relative name: a single-sample kind, nothing hidden."""
    reader = registry.reader_for(posixpath.splitext(name)[1].lower())
    hidden = any(part.startswith(".") for part in name.split("/"))
    return reader is not None and reader.in_folders and not hidden


def _url_units(objects: dict[str, dict], folder: str | None) -> list[Unit] | None:
    """The units of what one URL pattern names (storage.remote.expand): each object a glob or an object
    URL names, or a folder's images; None when it names nothing."""
    if not objects:
        return None
    if folder is None:
        return [_named_file(url, url) for url in objects]
    named = {url: url[len(folder) :].lstrip("/") for url in objects}
    return [_unit_of_file(url, name) for url, name in named.items() if _claimed(name)]


def _scan_folder(folder: Path) -> list[Unit]:
    """The single-sample files (images) under `folder`, recursively; containers in a folder are not picked
    up."""
    units = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if _claimed(fname):
                path = Path(dirpath) / fname
                units.append(_unit_of_file(str(path), path.relative_to(folder).as_posix()))
    return units


def _local_units(pattern: str) -> list[Unit] | None:
    """The units of one local path pattern; None when it matches nothing."""
    found: list[Unit] | None = None
    for p in sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]:
        path = Path(p).expanduser().absolute()
        if path.is_dir():
            found = (found or []) + _scan_folder(path)
        elif path.is_file():
            found = (found or []) + [_named_file(str(path), p)]
    return found


def expand_inputs(inputs: list[str]) -> list[Unit]:
    """INPUT arguments (paths, URLs, globs, brace patterns) -> units, deduplicated, in a stable order.

    Raises ConfigError when an input matches nothing or when nothing usable is found.
    """
    units: dict[str, Unit] = {}
    for arg in inputs:
        matched = False
        patterns = _expand_braces(arg)
        listed = remote.expand_all([p for p in patterns if remote.is_url(p)])
        for pattern in patterns:
            found = _url_units(*listed[pattern]) if pattern in listed else _local_units(pattern)
            if found is not None:
                matched = True
                for unit in found:
                    units.setdefault(unit.id, unit)
        if not matched:
            raise ConfigError(f"input {arg}: no such file or folder (or the pattern matches nothing)")
    if not units:
        raise ConfigError(f"no images found in {' '.join(inputs)}")
    return list(units.values())


def read_unit(unit: Unit) -> Iterator[RawSample | Skip]:
    yield from registry.reader_of(unit.kind).read(unit)


def unit_keys(unit: Unit) -> list[str]:
    """The source keys a unit holds, cheaply (tar headers only, the Parquet key column, an image's name):
    the same keys `read_unit` yields for its samples."""
    return registry.reader_of(unit.kind).keys(unit)


TAR_SCAN_BUDGET_S = 2.0  # header scans for a progress total: ~16 us a member, warm (a 96-sample tar: 5 ms)


def count_samples(units: list[Unit], budget_s: float = TAR_SCAN_BUDGET_S) -> int:
    """About how many samples `read_unit` yields from `units`, cheaply, for a progress bar's total: an
    image is one, a Parquet file its row count (footer metadata), a tar the keys in its headers. Tars
    left when `budget_s` of header scans is spent are estimated from the scanned ones' samples per byte."""
    total, scanned_samples, scanned_bytes, left_bytes, spent = 0, 0, 0, 0, 0.0
    for unit in units:
        counted = registry.reader_of(unit.kind).count
        if counted is not None:
            total += counted(unit)
        elif spent < budget_s or not scanned_bytes:
            t0 = time.perf_counter()
            n = len(unit_keys(unit))
            spent += time.perf_counter() - t0
            total, scanned_samples = total + n, scanned_samples + n
            scanned_bytes += remote.size(unit.path) or 0
        else:
            left_bytes += remote.size(unit.path) or 0
    if left_bytes and scanned_bytes:
        total += round(left_bytes * scanned_samples / scanned_bytes)
    return total
