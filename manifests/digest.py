"""Digests that fingerprint inputs and parameters.

Raw inputs are digested cheaply from (relative path, size, mtime_ns); `content=True` hashes the bytes
instead, for `--verify` runs and for file systems whose mtimes cannot be trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1 << 20


def digest_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def digest_json(obj: Any) -> str:
    """Digest of a JSON-able value in canonical form (sorted keys, no whitespace)."""
    return digest_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def digest_stream(f: BinaryIO) -> str:
    """Digest of everything left to read in a binary file, read CHUNK bytes at a time."""
    h = hashlib.blake2b(digest_size=16)
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def digest_file_content(path: Path) -> str:
    with open(path, "rb") as f:
        return digest_stream(f)


def digest_input_file(path: Path, name: str, *, content: bool = False) -> str:
    """Digest of one raw input named `name` (its path relative to its input root)."""
    if content:
        return digest_json(["content", name, digest_file_content(path)])
    st = os.stat(path)
    return digest_json(["stat", name, st.st_size, st.st_mtime_ns])
