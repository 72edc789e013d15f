"""Files at fsspec URLs (`s3://`, `gs://`, `https://`, `memory://`, ...) beside local paths: listing,
streaming reads and the store's own fingerprint of each object, in one place.

Every function takes a local path or a URL; local paths never touch fsspec. A listing (`expand`)
remembers what the store said of each object (size, ETag, version, last-modified), so fingerprinting
the objects it found costs no further request: `pipeline status` over many shards is one listing per
INPUT pattern.

Credentials come the standard way: the environment (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`,
`GOOGLE_APPLICATION_CREDENTIALS`, `FSSPEC_S3_ENDPOINT_URL`, ...), the store's own profile files, or
`storage_options` in pipeline.toml (`configure`), which fsspec applies to every filesystem of that
protocol. None of it is written to a manifest or a log: manifests record URLs and fingerprints only.
"""

from __future__ import annotations

import glob
import os
import posixpath
import re
from pathlib import Path
from typing import IO, Any

from core.errors import ConfigError
from manifests.digest import digest_input_file, digest_json, digest_stream

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
READ_BLOCK = 8 << 20  # bytes a streaming read fetches per request: memory stays this, not the object
# what a listing says of an object that changes when its bytes do, most telling first (S3, GCS, HTTP, ...)
FINGERPRINT_KEYS = ("ETag", "etag", "VersionId", "generation", "md5Hash", "crc32c", "LastModified", "mtime")

_INFO: dict[str, dict[str, Any]] = {}  # URL -> what the last listing of it said (per process)
_LISTED: set[str] = set()  # folder URLs listed whole (with everything under them) by `expand`


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL that fsspec opens (`s3://...`, `file://...`), not a plain local path."""
    return _URL.match(str(path)) is not None


def configure(storage_options: dict[str, dict[str, Any]]) -> None:
    """pipeline.toml's `[storage_options.PROTOCOL]` tables: keyword arguments fsspec gives every filesystem
    of that protocol made after this call (`endpoint_url`, `anon`, `profile`, ...)."""
    import fsspec.config

    for protocol, options in storage_options.items():
        if not isinstance(options, dict):
            kind = type(options).__name__
            raise ConfigError(f"storage_options.{protocol} must be a table of options, not a {kind}")
        fsspec.config.conf.setdefault(protocol, {}).update(options)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL; a missing driver (s3fs, gcsfs...) is a ConfigError."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"{url}: {e}") from None


def _url_of(fs: Any, path: str) -> str:
    return fs.unstrip_protocol(path)


def expand_all(patterns: list[str]) -> dict[str, tuple[dict[str, dict[str, Any]], str | None]]:
    """`expand` of each URL pattern, listed fresh, each folder that holds several of the objects named
    (`{00000..09999}.tar`) listed once rather than asked about each object."""
    named: dict[str, list[str]] = {}
    for pattern in patterns:
        if not glob.has_magic(pattern):
            named.setdefault(posixpath.dirname(pattern.rstrip("/")), []).append(pattern)
    for pattern in patterns:
        filesystem(pattern)[0].invalidate_cache()  # no request: forgets this process's earlier listings
    for parent, members in named.items():
        if len(members) > 1:
            fs, path = filesystem(parent)
            try:
                fs.ls(path, detail=True)  # kept in the filesystem's listing cache, which `info` reads first
            except FileNotFoundError:
                pass
    return {pattern: expand(pattern, fresh=False) for pattern in patterns}


def expand(pattern: str, *, fresh: bool = True) -> tuple[dict[str, dict[str, Any]], str | None]:
    """What a URL pattern names: ({URL of each object: what the store says of it}, sorted by URL; the
    folder's URL when the pattern named a folder, else None). A glob (`*`, `?`, `[...]`) names the objects
    it matches, a folder every object under it, an object itself. Listed `fresh` (nothing kept from an
    earlier listing), and remembered for `fingerprint`."""
    fs, path = filesystem(pattern)
    if fresh:
        fs.invalidate_cache()
    folder = None
    if glob.has_magic(path):
        found = fs.glob(path, detail=True)
    else:
        try:
            entry = fs.info(path)
        except FileNotFoundError:
            return {}, None
        if entry["type"] == "directory":
            found, folder = fs.find(path, detail=True), _url_of(fs, path.rstrip("/"))
        else:
            found = {path: entry}
    objects = {_url_of(fs, p): dict(entry) for p, entry in sorted(found.items()) if entry["type"] == "file"}
    _INFO.update(objects)
    if folder is not None:
        _LISTED.add(folder + "/")
    return objects, folder


def info(url: str) -> dict[str, Any]:
    """What the store says of one object: remembered from the last listing of it, else asked."""
    if url not in _INFO:
        fs, path = filesystem(url)
        fs.invalidate_cache(path)
        _INFO[url] = dict(fs.info(path))
    return _INFO[url]


def fingerprint(url: str) -> list[Any]:
    """What changes when an object's bytes do, as the store reports it: size plus its ETag, version,
    checksum and last-modified time where it has them. Stores that report only a size (some HTTP servers)
    cannot tell an edit of the same length: `--verify` hashes content."""
    entry = info(url)
    return [entry.get("size")] + [[k, str(entry[k])] for k in FINGERPRINT_KEYS if entry.get(k) is not None]


def open_read(path: str | os.PathLike) -> IO[bytes]:
    """A binary file for reading: local, or streamed from the store READ_BLOCK bytes at a time."""
    if not is_url(path):
        return open(path, "rb")
    fs, inner = filesystem(str(path))
    return fs.open(inner, "rb", block_size=READ_BLOCK)


def size(path: str | os.PathLike) -> int | None:
    """Bytes in a file or object, None when it is not there."""
    if not is_url(path):
        return os.path.getsize(path) if os.path.isfile(path) else None
    if str(path) not in _INFO and any(str(path).startswith(folder) for folder in _LISTED):
        return None  # not in its folder's listing (an image's absent caption file): no request
    try:
        return int(info(str(path))["size"])
    except FileNotFoundError:
        return None


def exists(path: str | os.PathLike) -> bool:
    return size(path) is not None


def digest_input(path: str | os.PathLike, name: str, *, content: bool = False) -> str:
    """Digest of one raw input named `name`, for rerun decisions: a local file's (size, mtime), an
    object's fingerprint; `content=True` hashes the bytes (`--verify`)."""
    if not is_url(path):
        return digest_input_file(Path(path), name, content=content)
    if content:
        return digest_json(["content", name, content_digest(path)])
    return digest_json(["store", name, fingerprint(str(path))])


def content_digest(path: str | os.PathLike) -> str:
    """Digest of a file's or object's bytes (streamed)."""
    with open_read(path) as f:
        return digest_stream(f)


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_read(path) as f:
        return f.read()
