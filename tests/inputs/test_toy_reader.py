"""Adding an input format is its module and one line in inputs/registry.py: a toy zip reader, registered
with that one line, is expanded, planned, embedded, counted and rerun by `pipeline embed` with no other
change."""

from __future__ import annotations

import posixpath
import zipfile
from collections.abc import Iterator

import pyarrow.parquet as pq
import pytest
from factories import embed_config, image_bytes

from core.errors import ConfigError
from inputs import registry
from inputs.image_file import IMAGE_EXTENSIONS
from inputs.reader import Reader
from inputs.units import RawSample, Skip, Unit
from pipeline.embed.stage import run_embed


def _members(unit: Unit) -> list[zipfile.ZipInfo]:
    with zipfile.ZipFile(unit.path) as archive:
        return [info for info in archive.infolist() if not info.is_dir()]


def _read_zip(unit: Unit) -> Iterator[RawSample | Skip]:
    """Each image member is a sample keyed by its name without extension; anything else is skipped."""
    with zipfile.ZipFile(unit.path) as archive:
        for info in _members(unit):
            key, ext = posixpath.splitext(info.filename)
            source = f"{unit.path}#{info.filename}"
            if ext.lower() not in IMAGE_EXTENSIONS:
                yield Skip("not_an_image", source)
                continue
            yield RawSample(key=key, data=archive.read(info), source=source)


ZIPS = Reader(
    "zip",
    (".zip",),
    read=_read_zip,
    keys=lambda unit: [posixpath.splitext(i.filename)[0] for i in _members(unit)],
    count=lambda unit: len(_members(unit)),
)


def _zip(path, names):
    with zipfile.ZipFile(path, "w") as archive:
        for i, name in enumerate(names):
            data = image_bytes((40 * i, 90, 60), size=(32, 32)) if name.endswith(".jpg") else b"notes"
            archive.writestr(name, data)
    return path


def test_a_registered_zip_reader_is_embedded_counted_and_rerun_by_pipeline_embed(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "photos.zip", ["a/one.jpg", "a/two.jpg", "readme.txt", "three.jpg"])
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="unsupported file type"):
        run_embed(embed_config([archive], cache))  # not registered: refused like any unknown file

    monkeypatch.setattr(registry, "READERS", (*registry.READERS, ZIPS))  # the one registry line
    result = run_embed(embed_config([archive], cache))
    assert result.shards_run == [0] and result.rows_written == 3
    assert result.dropped == {"not_an_image": 1}
    keys = pq.read_table(cache / "embed" / "00000.parquet").column("key").to_pylist()
    assert sorted(keys) == ["a/one", "a/two", "three"]

    assert run_embed(embed_config([archive], cache)).shards_run == []  # up to date: nothing redone
    _zip(archive, ["a/one.jpg", "three.jpg"])  # the archive changed: its shard is remade
    again = run_embed(embed_config([archive], cache))
    assert again.shards_run == [0] and again.rows_written == 2
