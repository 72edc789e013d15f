"""Input sources for `pipeline embed`: folders of images, WebDataset tars, Parquet files.

`expand_inputs` turns the user's INPUT arguments into *units*, the smallest things the shard plan
assigns: one image file, one tar, or one Parquet file. `read_unit` streams raw samples from a unit.
Nothing here decodes images; bad members are yielded as `Skip(reason)` so they are counted, not lost.
"""

from __future__ import annotations

import glob
import os
import posixpath
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TAR_EXTENSIONS = (".tar",)
PARQUET_EXTENSIONS = (".parquet",)
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes", "bytes")
CAPTION_COLUMNS = ("caption", "text", "txt")
KEY_COLUMNS = ("key", "__key__", "id")
KEY_PREFIXES = ("none", "input")  # or a TEMPLATE with {input}, {parent}, {stem}


@dataclass(frozen=True)
class Unit:
    """The smallest input the shard plan assigns. `id` is stable across runs (the absolute path)."""

    kind: str  # "image" | "tar" | "parquet"
    path: str  # absolute path
    name: str  # path relative to its input root (images) or the file name: used in keys and digests

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.path}"

    @property
    def key(self) -> str | None:
        """Cache key of an image unit: its relative path without extension."""
        return posixpath.splitext(self.name)[0] if self.kind == "image" else None

    @property
    def input_name(self) -> str:
        """The name of the folder this unit was found in (an image's input folder, a file's parent)."""
        root = self.path[: -len(self.name)] if self.kind == "image" else os.path.dirname(self.path)
        return os.path.basename(root.rstrip("/")) or "root"


def key_prefix(unit: Unit, mode: str) -> str:
    """What `--key-prefix` puts before each key of `unit`: nothing (none), its input folder's name
    (input), or a TEMPLATE filled with {input}, {parent} (the file's folder) and {stem} (its name)."""
    if mode == "none":
        return ""
    if mode == "input":
        return f"{unit.input_name}/"
    parent, stem = os.path.basename(os.path.dirname(unit.path)), Path(unit.path).stem
    return mode.format(input=unit.input_name, parent=parent, stem=stem).strip("/") + "/"


def check_key_prefix(mode: str) -> None:
    if mode in KEY_PREFIXES:
        return
    try:
        filled = mode.format(input="i", parent="p", stem="s")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"--key-prefix {mode}: a TEMPLATE may use only {{input}}, {{parent}} and {{stem}} ({e})"
        ) from None
    if not filled.strip("/") or _unsafe(filled):
        raise ConfigError(f"--key-prefix {mode}: must give a non-empty relative name")


@dataclass(frozen=True)
class RawSample:
    key: str
    data: bytes
    source: str  # where it came from, for the sample's json
    caption: str | None = None  # the source's own caption, if it had one (img2dataset `.txt`)
    labels: str | None = None  # the source's `.json` metadata (e.g. the synthetic world's attributes)


@dataclass(frozen=True)
class Skip:
    reason: str
    source: str


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _expand_braces(pattern: str) -> list[str]:
    if "{" not in pattern:
        return [pattern]
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def _units_of_file(path: Path, root: Path) -> Unit | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return Unit("image", str(path), path.relative_to(root).as_posix())
    if suffix in TAR_EXTENSIONS:
        return Unit("tar", str(path), path.name)
    if suffix in PARQUET_EXTENSIONS:
        return Unit("parquet", str(path), path.name)
    return None


def _scan_folder(folder: Path) -> list[Unit]:
    """Images under `folder`, recursively; tars and Parquet files in a folder are not picked up."""
    units = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith(".") or not fname.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(dirpath) / fname
            units.append(Unit("image", str(path), path.relative_to(folder).as_posix()))
    return units


def expand_inputs(inputs: list[str]) -> list[Unit]:
    """INPUT arguments (paths, globs, brace patterns) -> units, deduplicated, in a stable order.

    Raises ConfigError when an input matches nothing or when nothing usable is found.
    """
    units: dict[str, Unit] = {}
    for arg in inputs:
        matched = False
        for pattern in _expand_braces(arg):
            paths = sorted(glob.glob(pattern)) if _has_magic(pattern) else [pattern]
            for p in paths:
                path = Path(p).expanduser().absolute()
                if path.is_dir():
                    found = _scan_folder(path)
                elif path.is_file():
                    unit = _units_of_file(path, path.parent)
                    if unit is None:
                        raise ConfigError(
                            f"input {p}: unsupported file type; give image files "
                            f"({', '.join(IMAGE_EXTENSIONS)}), .tar shards, .parquet files or folders"
                        )
                    if unit.kind == "parquet":
                        parquet_columns(unit.path)  # fail now, not half-way through a run
                    found = [unit]
                else:
                    continue
                matched = True
                for unit in found:
                    units.setdefault(unit.id, unit)
        if not matched:
            raise ConfigError(f"input {arg}: no such file or folder (or the pattern matches nothing)")
    if not units:
        raise ConfigError(f"no images found in {' '.join(inputs)}")
    return list(units.values())


def read_unit(unit: Unit) -> Iterator[RawSample | Skip]:
    if unit.kind == "image":
        yield from _read_image_file(unit)
    elif unit.kind == "tar":
        yield from _read_tar(unit)
    elif unit.kind == "parquet":
        yield from _read_parquet(unit)
    else:
        raise ValueError(f"unknown unit kind {unit.kind}")


def _read_image_file(unit: Unit) -> Iterator[RawSample | Skip]:
    try:
        data = Path(unit.path).read_bytes()
    except OSError:
        yield Skip("unreadable_file", unit.path)
        return
    # img2dataset folder layout: {key}.txt and {key}.json beside the image
    txt, meta = Path(unit.path).with_suffix(".txt"), Path(unit.path).with_suffix(".json")
    caption = _decode_text(txt.read_bytes()) if txt.is_file() else None
    labels = _decode_text(meta.read_bytes()) if meta.is_file() else None
    yield RawSample(key=unit.key, data=data, source=unit.path, caption=caption, labels=labels)


def _decode_text(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem), ext.lower()


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/") or "\\" in name or "\x00" in name


def unit_keys(unit: Unit) -> list[str]:
    """The source keys a unit holds, cheaply: tar headers only (data is seeked over), the Parquet key
    column, an image's name. The same keys `read_unit` yields for its samples."""
    if unit.kind == "image":
        return [unit.key]
    if unit.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            _, key_col, _ = parquet_columns(unit.path)
            if key_col:
                return [str(k) for k in pq.read_table(unit.path, columns=[key_col])[key_col].to_pylist()]
            stem = Path(unit.path).stem
            return [f"{stem}/{row:09d}" for row in range(pq.ParquetFile(unit.path).metadata.num_rows)]
        except (ConfigError, OSError):
            return []  # read as corrupt_parquet later
    keys: list[str] = []
    try:
        with tarfile.open(unit.path, mode="r:*") as tar:
            for member in tar:
                if member.isfile() and not _unsafe(member.name):
                    key = _split_member(member.name)[0]
                    if not keys or keys[-1] != key:
                        keys.append(key)
    except (tarfile.TarError, OSError, EOFError):
        pass  # counted as corrupt_tar when read
    return keys


TAR_SCAN_BUDGET_S = 2.0  # header scans for a progress total: ~16 us a member, warm (a 96-sample tar: 5 ms)


def count_samples(units: list[Unit], budget_s: float = TAR_SCAN_BUDGET_S) -> int:
    """About how many samples `read_unit` yields from `units`, cheaply, for a progress bar's total: an
    image is one, a Parquet file its row count (footer metadata), a tar the keys in its headers. Tars
    left when `budget_s` of header scans is spent are estimated from the scanned ones' samples per byte."""
    total, scanned_samples, scanned_bytes, left_bytes, spent = 0, 0, 0, 0, 0.0
    for unit in units:
        if unit.kind == "image":
            total += 1
        elif unit.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                total += pq.ParquetFile(unit.path).metadata.num_rows
            except OSError:
                pass  # read as corrupt_parquet later
        elif spent < budget_s or not scanned_bytes:
            t0 = time.perf_counter()
            n = len(unit_keys(unit))
            spent += time.perf_counter() - t0
            total, scanned_samples = total + n, scanned_samples + n
            scanned_bytes += os.path.getsize(unit.path) if os.path.exists(unit.path) else 0
        else:
            left_bytes += os.path.getsize(unit.path) if os.path.exists(unit.path) else 0
    if left_bytes and scanned_bytes:
        total += round(left_bytes * scanned_samples / scanned_bytes)
    return total


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
        caption = _decode_text(files["txt"]) if "txt" in files else None
        labels = _decode_text(files["json"]) if "json" in files else None
        yield RawSample(key=current_key, data=files[image_ext], source=source, caption=caption, labels=labels)

    try:
        with tarfile.open(unit.path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    if not member.isdir():
                        yield Skip("unsafe_tar_member", f"{unit.path}#{member.name}")
                    continue
                if _unsafe(member.name):
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
        # A truncated or corrupt tar: keep what was read so far, count the rest as one lost tail.
        yield Skip("corrupt_tar", f"{unit.path}: {e}")


def _pick_column(names: list[str], preferred: tuple[str, ...]) -> str | None:
    lowered = {n.lower(): n for n in names}
    return next((lowered[p] for p in preferred if p in lowered), None)


def parquet_columns(path: str) -> tuple[str, str | None, str | None]:
    """(image, key, caption) column names of an image Parquet file; ConfigError if it has no images."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
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
        pf = pq.ParquetFile(unit.path)
    except (ConfigError, OSError) as e:  # changed since planning
        yield Skip("corrupt_parquet", f"{unit.path}: {e}")
        return
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
