"""Reading a caption corpus for the captions step (pipeline/retrieve/captions.py): `.txt` (one caption per
line), `.jsonl`/`.ndjson`, `.csv`/`.tsv` or `.parquet` (a caption column), one file or many (globs, folders),
each plain or gzip (sniffed from the magic bytes, not the name). Every caption is whitespace-normalised;
empty, non-UTF-8 and malformed records are dropped and counted by reason.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

from core.errors import ConfigError
from storage import remote

FORMATS = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}


GZIP_MAGIC = b"\x1f\x8b"


def normalise_caption(text: str) -> str:
    """Collapse every run of whitespace (tabs, newlines, NBSP...) to one space; strip a BOM and the ends."""
    return " ".join(text.lstrip("\ufeff").split())


def corpus_files(patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Expand --captions arguments to files (resolved paths, or URLs), in argument order; each glob or
    folder sorted by name."""
    files: list[str] = []
    for pattern in patterns:
        matches = _url_matches(pattern) if remote.is_url(pattern) else _local_matches(pattern)
        if not matches:
            raise ConfigError(f"--captions {pattern}: matches no caption file")
        for path in matches:
            _format(path)  # refuse an unknown format before reading anything
            if path not in files:
                files.append(path)
    return files


def _local_matches(pattern: str) -> list[str]:
    if glob.has_magic(pattern):
        found = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
    elif Path(pattern).is_dir():
        found = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and _format(str(p), strict=False))
    elif Path(pattern).is_file():
        found = [Path(pattern)]
    else:
        raise ConfigError(f"--captions {pattern}: no such file")
    return [str(p.resolve()) for p in found]


def _url_matches(pattern: str) -> list[str]:
    objects, folder = remote.expand(pattern)
    if not objects and folder is None and not glob.has_magic(pattern):
        raise ConfigError(f"--captions {pattern}: no such file")
    return [url for url in objects if folder is None or _format(url, strict=False)]


def _format(path: str, strict: bool = True) -> str | None:
    suffixes = [s.lower() for s in PurePosixPath(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None and strict:
        raise ConfigError(
            f"--captions {path}: unknown caption file format; use .txt, .jsonl, .csv, .tsv or .parquet "
            "(optionally .gz)"
        )
    return fmt


@contextmanager
def _open(path: str) -> Iterator[IO[bytes]]:
    """A corpus file's bytes, gunzipped when it starts with gzip's magic (whatever its name)."""
    with remote.open_read(path) as f:
        magic = f.read(2)
        f.seek(0)
        if magic != GZIP_MAGIC:
            yield f
            return
        with gzip.GzipFile(fileobj=f, mode="rb") as unzipped:
            yield unzipped


def read_corpus(files: list[str], column: str = "caption") -> Iterator[tuple[str | None, str | None]]:
    """Yield `(caption, None)` for each normalised caption or `(None, reason)` for each dropped record.

    Duplicates are not removed here (see `plan_captions`).
    """
    readers = {
        "txt": _read_txt,
        "jsonl": _read_jsonl,
        "csv": _read_csv,
        "tsv": _read_csv,
        "parquet": _read_parquet,
    }
    for path in files:
        fmt = _format(path)
        try:
            for raw, reason in readers[fmt](path, column, fmt):
                if reason is not None:
                    yield None, reason
                    continue
                text = normalise_caption(raw)
                yield (text, None) if text else (None, "empty")
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ConfigError(f"--captions {path}: cannot read ({e})") from None


def _read_txt(path: str, column: str, fmt: str) -> Iterator[tuple[str | None, str | None]]:
    with _open(path) as f:
        for line in f:
            try:
                yield line.decode("utf-8"), None
            except UnicodeDecodeError:
                yield None, "non_utf8"


def _read_jsonl(path: str, column: str, fmt: str) -> Iterator[tuple[str | None, str | None]]:
    records = with_column = 0
    first_keys: list[str] | None = None
    with _open(path) as f:
        for line in f:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                yield None, "non_utf8"
                continue
            if not text.strip():
                yield None, "empty"
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                yield None, "bad_json"
                continue
            records += 1
            if not isinstance(record, dict):
                yield None, "bad_record"
                continue
            if first_keys is None:
                first_keys = sorted(record)
            value = record.get(column)
            if column in record:
                with_column += 1
            if isinstance(value, str):
                yield value, None
            else:
                yield None, "empty" if value is None else "bad_record"
    if records and not with_column:
        raise ConfigError(
            f"--caption-column {column}: not a key of the records in {path} "
            f"(keys: {', '.join(first_keys or [])})"
        )


def _read_csv(path: str, column: str, fmt: str) -> Iterator[tuple[str | None, str | None]]:
    csv.field_size_limit(1 << 24)
    with _open(path) as raw:
        # surrogateescape keeps the reader going through bad bytes; the value is checked for them below.
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter="\t" if fmt == "tsv" else ",")
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [normalise_caption(h) for h in header]
            if column not in header:
                raise ConfigError(
                    f"--caption-column {column}: not a column of {path} (columns: {', '.join(header)})"
                )
            at = header.index(column)
            for row in reader:
                if not row:
                    yield None, "empty"
                elif len(row) <= at:
                    yield None, "bad_record"
                else:
                    try:
                        row[at].encode("utf-8")
                    except UnicodeEncodeError:
                        yield None, "non_utf8"
                        continue
                    yield row[at], None
        except csv.Error as e:
            where = f"{path}: malformed {fmt.upper()} at line {reader.line_num}"
            raise ConfigError(f"--captions {where} ({e})") from None


def _read_parquet(path: str, column: str, fmt: str) -> Iterator[tuple[str | None, str | None]]:
    with remote.open_read(path) as f:
        yield from _parquet_captions(path, f, column)


def _parquet_captions(path: str, f: IO[bytes], column: str) -> Iterator[tuple[str | None, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except pa.ArrowInvalid as e:
        raise ConfigError(f"--captions {path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise ConfigError(f"--caption-column {column}: not a column of {path} (columns: {', '.join(names)})")
    kind = pf.schema_arrow.field(column).type
    if not (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        raise ConfigError(f"--caption-column {column}: {path} stores {kind} there, not text")
    for batch in pf.iter_batches(batch_size=65_536, columns=[column]):
        # As bytes: Parquet does not promise valid UTF-8, and a bad value must be counted, not crash the read.
        for value in batch.column(0).cast(pa.large_binary()).to_pylist():
            if value is None:
                yield None, "empty"
                continue
            try:
                yield value.decode("utf-8"), None
            except UnicodeDecodeError:
                yield None, "non_utf8"
