"""WebDataset tars: members grouped by key (the path up to the first dot of the basename), streamed and
never extracted to disk; unsafe member names and a truncated tail are skipped and counted."""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator

from inputs.reader import Reader
from inputs.units import RawSample, Skip, Unit, decode_text, unsafe_name
from storage import remote


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem), ext.lower()


def _read_tar(unit: Unit) -> Iterator[RawSample | Skip]:
    """Group consecutive members by key (WebDataset order); never extracts anything to disk."""
    current_key: str | None = None
    files: dict[str, bytes] = {}

    def flush() -> Iterator[RawSample | Skip]:
        if current_key is None:
            return
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp", "bmp") if e in files), None)
        source = f"{unit.path}#{current_key}"
        if image_ext is None:
            yield Skip("no_image_in_sample", source)
            return
        caption = decode_text(files["txt"]) if "txt" in files else None
        labels = decode_text(files["json"]) if "json" in files else None
        yield RawSample(key=current_key, data=files[image_ext], source=source, caption=caption, labels=labels)

    try:
        with remote.open_read(unit.path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    if not member.isdir():
                        yield Skip("unsafe_tar_member", f"{unit.path}#{member.name}")
                    continue
                if unsafe_name(member.name):
                    yield Skip("unsafe_tar_member", f"{unit.path}#{member.name}")
                    continue
                key, ext = _split_member(member.name)
                if key != current_key:
                    yield from flush()
                    current_key, files = key, {}
                handle = tar.extractfile(member)
                files[ext] = handle.read() if handle is not None else b""
            yield from flush()
    except (tarfile.TarError, OSError, EOFError) as e:
        if isinstance(e, OSError) and remote.is_url(unit.path):
            raise  # the store failed (after its retries), not the tar: the shard fails, and a rerun retries
        # A truncated or corrupt tar: keep what was read so far, count the rest as one lost tail.
        yield Skip("corrupt_tar", f"{unit.path}: {e}")


def _keys(unit: Unit) -> list[str]:
    """The sample keys in a tar's headers (the data is seeked over)."""
    keys: list[str] = []
    try:  # seeking over the data; an object in a store is streamed (a ranged read would be a request each)
        mode = "r|*" if remote.is_url(unit.path) else "r:*"
        with remote.open_read(unit.path) as f, tarfile.open(fileobj=f, mode=mode) as tar:
            for member in tar:
                if member.isfile() and not unsafe_name(member.name):
                    key = _split_member(member.name)[0]
                    if not keys or keys[-1] != key:
                        keys.append(key)
    except (tarfile.TarError, OSError, EOFError):
        pass  # counted as corrupt_tar when read
    return keys


TARS = Reader("tar", (".tar",), read=_read_tar, keys=_keys)
