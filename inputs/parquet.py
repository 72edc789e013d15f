"""Parquet files of image bytes (an `image`-like column; Hugging Face's {bytes, path} structs too), with
optional key and caption columns; streamed in batches of rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from core.errors import ConfigError
from inputs.reader import Reader
from inputs.units import RawSample, Skip, Unit
from storage import remote

IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes", "bytes")
CAPTION_COLUMNS = ("caption", "text", "txt")
KEY_COLUMNS = ("key", "__key__", "id")


def _pick_column(names: list[str], preferred: tuple[str, ...]) -> str | None:
    lowered = {n.lower(): n for n in names}
    return next((lowered[p] for p in preferred if p in lowered), None)


def parquet_columns(path: str) -> tuple[str, str | None, str | None]:
    """(image, key, caption) column names of an image Parquet file; ConfigError if it has no images."""
    import pyarrow.parquet as pq

    try:
        with remote.open_read(path) as f:
            names = pq.read_schema(f).names
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ConfigError(f"input {path}: not a readable Parquet file ({e})") from None
    image_col = _pick_column(names, IMAGE_COLUMNS)
    if image_col is None:
        raise ConfigError(
            f"input {path}: no image-bytes column (looked for {', '.join(IMAGE_COLUMNS)}); "
            "columns are: " + ", ".join(names)
        )
    return image_col, _pick_column(names, KEY_COLUMNS), _pick_column(names, CAPTION_COLUMNS)


def _read_parquet(unit: Unit) -> Iterator[RawSample | Skip]:
    import pyarrow.parquet as pq

    try:
        image_col, key_col, caption_col = parquet_columns(unit.path)
        f = remote.open_read(unit.path)
    except (ConfigError, OSError) as e:  # changed since planning
        yield Skip("corrupt_parquet", f"{unit.path}: {e}")
        return
    with f:
        yield from _rows(unit, pq.ParquetFile(f), image_col, key_col, caption_col)


def _rows(
    unit: Unit, pf, image_col: str, key_col: str | None, caption_col: str | None
) -> Iterator[RawSample | Skip]:
    stem = Path(unit.path).stem
    row = 0
    columns = [c for c in (image_col, key_col, caption_col) if c]
    for batch in pf.iter_batches(batch_size=256, columns=columns):
        records = batch.to_pydict()
        for i, image in enumerate(records[image_col]):
            key = str(records[key_col][i]) if key_col else f"{stem}/{row:09d}"
            source = f"{unit.path}#{row}"
            row += 1
            if isinstance(image, dict):  # Hugging Face datasets store images as {bytes, path}
                image = image.get("bytes")
            if not isinstance(image, (bytes, bytearray)):
                yield Skip("empty" if image is None else "undecodable", source)
                continue
            caption = records[caption_col][i] if caption_col else None
            caption = caption.strip() or None if isinstance(caption, str) else None
            yield RawSample(key=key, data=bytes(image), source=source, caption=caption)


def _keys(unit: Unit) -> list[str]:
    """The key column, or the row keys `read` makes without one."""
    import pyarrow.parquet as pq

    try:
        _, key_col, _ = parquet_columns(unit.path)
        with remote.open_read(unit.path) as f:
            if key_col:
                return [str(k) for k in pq.read_table(f, columns=[key_col])[key_col].to_pylist()]
            stem = Path(unit.path).stem
            return [f"{stem}/{row:09d}" for row in range(pq.ParquetFile(f).metadata.num_rows)]
    except (ConfigError, OSError):
        return []  # read as corrupt_parquet later


def _count(unit: Unit) -> int:
    """The row count, from the footer."""
    import pyarrow.parquet as pq

    try:
        with remote.open_read(unit.path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except OSError:
        return 0  # read as corrupt_parquet later


PARQUET = Reader(
    "parquet",
    (".parquet",),
    read=_read_parquet,
    keys=_keys,
    count=_count,
    check=lambda unit: parquet_columns(unit.path) and None,  # fail now, not half-way through a run
)
