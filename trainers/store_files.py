"""The files of the trainers' derived stores (trainers/sample_store.py, trainers/derived_store.py): .npy
arrays read one row (or one span of rows) per `pread`, and store folders that appear whole or not at all.

Nothing here maps a file or keeps what it read, so a process's memory does not grow with the rows it
reads; the kernel's page cache, shared by every process on the node, keeps what was read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


class RowFile:
    """The rows of an .npy file, read on request with one `pread` each: `f[i]`, `f[idx]` (ints or a bool
    mask), `f.span(start, stop)`, `len(f)`, `f.shape`, `f.dtype`. Nothing is cached or mapped, so memory
    does not grow with the rows read; the fd is inherited by forked loader workers (pread moves no shared
    offset) and reopened by spawned ones."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                version, np.lib.format.read_array_header_2_0
            )
            self.shape, fortran, self.dtype = read_header(f)
            self.offset = f.tell()
        if fortran or not self.shape:
            raise ValueError(f"{self.path.name}: not a C-ordered array of rows")
        self.row_shape = tuple(self.shape[1:])
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        expected = self.offset + self.shape[0] * self.row_bytes
        if self.path.stat().st_size != expected:
            raise ValueError(f"{self.path.name}: {self.path.stat().st_size} bytes, not {expected}")
        # opened now, so forked loader workers inherit it and keep reading even if a newer store replaces
        # this one (the stores' pruning removes the folders nothing can use any more)
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, row: int, rows: int = 1) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, rows * self.row_bytes, self.offset + row * self.row_bytes)
        if len(data) != rows * self.row_bytes:
            raise ValueError(f"{self.path}: row {row} is cut short (the file changed)")
        return data

    def __getitem__(self, idx):
        if isinstance(idx, int | np.integer):
            return np.frombuffer(self._read(int(idx) % len(self)), self.dtype).reshape(self.row_shape)
        idx = np.asarray(idx)
        rows = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        flat = out.reshape(len(rows), int(np.prod(self.row_shape, dtype=np.int64)))  # works for 0 rows too
        for j, row in enumerate(rows.tolist()):
            flat[j] = np.frombuffer(self._read(row % len(self)), self.dtype)
        return out

    def span(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) in one `pread` (a copy: [stop - start, *row_shape])."""
        start, stop = max(0, start), min(stop, len(self))
        if stop <= start:
            return np.empty((0, *self.row_shape), self.dtype)
        data = self._read(start, stop - start)
        return np.frombuffer(data, self.dtype).reshape((stop - start, *self.row_shape)).copy()

    def any(self) -> bool:
        """Any element true (non-zero), read in contiguous chunks of 16 MiB, none kept."""
        step = max(1, (16 << 20) // self.row_bytes)
        for start in range(0, len(self), step):
            if np.frombuffer(self._read(start, min(step, len(self) - start)), self.dtype).any():
                return True
        return False


def npy_header(dtype: np.dtype, shape: tuple[int, ...], length: int) -> bytes:
    """An .npy (version 1.0) header of exactly `length` bytes (padded with spaces), so a file whose rows
    are streamed in before their number is known can get its header written last, in place."""
    text = repr(
        {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    room = length - 10 - 1  # magic, version and length field; the closing newline
    if len(text) > room:
        raise ValueError(f"an .npy header of shape {shape} does not fit in {length} bytes")
    body = (text + " " * (room - len(text)) + "\n").encode("latin1")
    return np.lib.format.MAGIC_PREFIX + bytes([1, 0]) + (length - 10).to_bytes(2, "little") + body


@contextmanager
def new_folder(folder: Path) -> Iterator[Path]:
    """A temp folder next to `folder` to fill, renamed into place when the block ends without an error
    (a store appears whole or not at all; a concurrent builder that got there first wins and this copy
    is dropped). Raises OSError when the cache cannot be written (read-only)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
