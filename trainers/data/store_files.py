"""The files of the trainers' derived stores (trainers/data/sample_store.py, trainers/data/derived_store.py):
.npy arrays read one row (or one span of rows) per `pread`, store folders that appear whole or not at all, and
the digests that let a reader trust them.

Nothing here maps a file or keeps what it read, so a process's memory does not grow with the rows it
reads; the kernel's page cache, shared by every process on the node, keeps what was read.

Every derived file carries a digest (blake2b-128) recorded when it was made, checked before a run uses it:
- a file read whole (caption features, the cached probe) ends in a trailer holding its payload's digest
  (`sealed` / `unsealed`), checked at every read; .npy and torch readers ignore the trailer;
- a store's row files (read per row, never whole) are listed in its info.json with their size, digest and
  stamps (mtime, ctime, inode) at the time they were hashed (`seal_files`). A reader trusts a file whose
  stamps are unchanged: any write through the file system changes its ctime, which no program can set
  back. A file with other stamps (damaged, or the cache copied) is hashed whole (`check_sealed`): a
  different digest is damage, the same one renews its stamps so the next process trusts it again. The
  info file digests itself (`info_bytes` / `read_info`). Costs: benchmarks/bench_store_verify.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from manifests import digest_bytes, digest_file_content, digest_json, write_bytes_atomic
from manifests.errors import CacheFault

SEAL = b"\nlafite-derived-blake2b-128:"  # then the payload's 32 hex digits
RECORD_DIGEST = "record_digest"  # info.json's digest of the rest of itself


def sealed(payload: bytes) -> bytes:
    """`payload` with a trailer holding its digest (see the module docstring)."""
    return payload + SEAL + digest_bytes(payload).encode()


def unsealed(data: bytes) -> bytes:
    """The payload of `sealed` bytes; ValueError when the trailer is missing or the payload differs from
    the digest it records."""
    size = len(SEAL) + 32
    if len(data) < size or data[-size:-32] != SEAL:
        raise ValueError("no digest trailer (cut short, or made by an older version)")
    payload = data[:-size]
    if digest_bytes(payload).encode() != data[-32:]:
        raise ValueError("damaged: its bytes differ from the digest recorded when it was made")
    return payload


def file_stamp(st: os.stat_result) -> list[int]:
    """What any write through the file system changes: [size, mtime_ns, ctime_ns, inode]."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def seal_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> {digest, stamp} of each file of `folder`, for its info.json (see `check_sealed`)."""
    return {
        name: {"digest": digest_file_content(folder / name), "stamp": file_stamp(os.stat(folder / name))}
        for name in names
    }


def check_sealed(folder: Path, files: dict[str, dict[str, Any]]) -> bool:
    """Raise ValueError naming the first of `files` (from `seal_files`) whose bytes differ from its digest.
    A file whose stamp is unchanged is trusted unread; any other is hashed, and its new stamp is put in
    `files` when intact. Returns whether a stamp was renewed (the caller records `files` again)."""
    renewed = False
    for name, sealed_file in files.items():
        st = os.stat(folder / name)
        if file_stamp(st) == sealed_file["stamp"]:
            continue
        if st.st_size != sealed_file["stamp"][0]:
            made = sealed_file["stamp"][0]
            raise ValueError(f"{name} is {st.st_size} bytes, not the {made} it was made with")
        if digest_file_content(folder / name) != sealed_file["digest"]:
            raise ValueError(f"{name} is damaged: its bytes differ from the digest recorded when it was made")
        sealed_file["stamp"], renewed = file_stamp(os.stat(folder / name)), True
    return renewed


def info_bytes(record: dict[str, Any]) -> bytes:
    """A store's info.json: `record` and the digest of it (see `read_info`)."""
    body = {k: v for k, v in record.items() if k != RECORD_DIGEST}
    return json.dumps({**body, RECORD_DIGEST: digest_json(body)}).encode()


def read_info(path: Path) -> dict[str, Any]:
    """The record of an info.json written by `info_bytes`; ValueError when damaged or not one."""
    try:
        record = json.loads(path.read_bytes())
    except ValueError as e:  # not UTF-8, not JSON
        raise ValueError(f"{path.name} is damaged: {e}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path.name} is damaged: not a record")
    body = {k: v for k, v in record.items() if k != RECORD_DIGEST}
    if record.get(RECORD_DIGEST) != digest_json(body):
        raise ValueError(f"{path.name} is damaged: it differs from the digest it records")
    return body


def renew_info(path: Path, record: dict[str, Any]) -> None:
    """Rewrite a store's info.json with renewed stamps, atomically; a cache that cannot be written keeps
    the old one (its readers hash the files again)."""
    try:
        write_bytes_atomic(path, info_bytes(record))
    except (OSError, CacheFault):
        pass


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
