"""Input sources for `pipeline embed`: the user's INPUT arguments as units, read by the format readers of
inputs/registry.py (folders of images, WebDataset tars, Parquet files, ...).

`expand_inputs` turns INPUT arguments into *units*, the smallest things the shard plan assigns: one image
file, one tar, or one Parquet file. `read_unit` streams raw samples from a unit. Nothing here decodes
images; bad members are yielded as `Skip(reason)` so they are counted, not lost.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Iterator
from pathlib import Path

from core.errors import ConfigError
from inputs import registry
from inputs.units import RawSample, Skip, Unit


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _expand_braces(pattern: str) -> list[str]:
    if "{" not in pattern:
        return [pattern]
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def _unit_of_file(path: Path, root: Path) -> Unit | None:
    reader = registry.reader_for(path.suffix.lower())
    if reader is None:
        return None
    return Unit(reader.kind, str(path), path.relative_to(root).as_posix() if reader.in_folders else path.name)


def _scan_folder(folder: Path) -> list[Unit]:
    """The single-sample files (images) under `folder`, recursively; containers in a folder are not picked
    up."""
    claimed = {ext: r.kind for r in registry.READERS if r.in_folders for ext in r.extensions}
    units = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            kind = claimed.get(os.path.splitext(fname)[1].lower())
            if fname.startswith(".") or kind is None:
                continue
            path = Path(dirpath) / fname
            units.append(Unit(kind, str(path), path.relative_to(folder).as_posix()))
    return units


def expand_inputs(inputs: list[str]) -> list[Unit]:
    """INPUT arguments (paths, globs, brace patterns) -> units, deduplicated, in a stable order.

    Raises ConfigError when an input matches nothing or when nothing usable is found.
    """
    units: dict[str, Unit] = {}
    for arg in inputs:
        matched = False
        for pattern in _expand_braces(arg):
            paths = sorted(glob.glob(pattern)) if _has_magic(pattern) else [pattern]
            for p in paths:
                path = Path(p).expanduser().absolute()
                if path.is_dir():
                    found = _scan_folder(path)
                elif path.is_file():
                    unit = _unit_of_file(path, path.parent)
                    if unit is None:
                        known = ", ".join(e for r in registry.READERS for e in r.extensions)
                        raise ConfigError(
                            f"input {p}: unsupported file type; give files of {known}, or folders"
                        )
                    registry.reader_of(unit.kind).check(unit)
                    found = [unit]
                else:
                    continue
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
            scanned_bytes += os.path.getsize(unit.path) if os.path.exists(unit.path) else 0
        else:
            left_bytes += os.path.getsize(unit.path) if os.path.exists(unit.path) else 0
    if left_bytes and scanned_bytes:
        total += round(left_bytes * scanned_samples / scanned_bytes)
    return total
