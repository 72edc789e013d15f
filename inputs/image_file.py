"""Image files, one sample each, named or found in folders (img2dataset's folder layout: `{key}.txt` and
`{key}.json` beside the image are its caption and labels)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from inputs.reader import Reader
from inputs.units import SAMPLE_FILE, RawSample, Skip, Unit, decode_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _read_image_file(unit: Unit) -> Iterator[RawSample | Skip]:
    try:
        data = Path(unit.path).read_bytes()
    except OSError:
        yield Skip("unreadable_file", unit.path)
        return
    # img2dataset folder layout: {key}.txt and {key}.json beside the image
    txt, meta = Path(unit.path).with_suffix(".txt"), Path(unit.path).with_suffix(".json")
    caption = decode_text(txt.read_bytes()) if txt.is_file() else None
    labels = decode_text(meta.read_bytes()) if meta.is_file() else None
    yield RawSample(key=unit.key, data=data, source=unit.path, caption=caption, labels=labels)


IMAGE_FILES = Reader(
    SAMPLE_FILE,
    IMAGE_EXTENSIONS,
    read=_read_image_file,
    keys=lambda unit: [unit.key],
    count=lambda unit: 1,
    in_folders=True,
)
