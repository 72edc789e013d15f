"""Image files, one sample each, named or found in folders (img2dataset's folder layout: `{key}.txt` and
`{key}.json` beside the image are its caption and labels)."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

from inputs.reader import Reader
from inputs.units import SAMPLE_FILE, RawSample, Skip, Unit, decode_text
from storage import remote

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _read_image_file(unit: Unit) -> Iterator[RawSample | Skip]:
    try:
        data = remote.read_bytes(unit.path)
    except OSError:
        yield Skip("unreadable_file", unit.path)
        return
    # img2dataset folder layout: {key}.txt and {key}.json beside the image
    stem = posixpath.splitext(unit.path)[0]
    caption, labels = (_sidecar(stem + ext) for ext in (".txt", ".json"))
    yield RawSample(key=unit.key, data=data, source=unit.path, caption=caption, labels=labels)


def _sidecar(path: str) -> str | None:
    try:
        return decode_text(remote.read_bytes(path)) if remote.exists(path) else None
    except OSError:
        return None


IMAGE_FILES = Reader(
    SAMPLE_FILE,
    IMAGE_EXTENSIONS,
    read=_read_image_file,
    keys=lambda unit: [unit.key],
    count=lambda unit: 1,
    in_folders=True,
)
