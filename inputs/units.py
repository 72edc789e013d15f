"""What the input readers yield and the shard plan assigns: units (one image file, one tar, one Parquet
file...), raw samples read from them, skipped samples with their reason, and the `--key-prefix` of a
unit's keys."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError

KEY_PREFIXES = ("none", "input")  # or a TEMPLATE with {input}, {parent}, {stem}
SAMPLE_FILE = "image"  # the kind of a unit that is one sample (an image file, keyed by its path)


@dataclass(frozen=True)
class Unit:
    """The smallest input the shard plan assigns. `id` is stable across runs (the absolute path)."""

    kind: str  # its reader's kind (inputs/registry.py): "image", "tar", "parquet", ...
    path: str  # absolute path
    name: str  # path relative to its input root (images) or the file name: used in keys and digests

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.path}"

    @property
    def key(self) -> str | None:
        """Cache key of an image unit: its relative path without extension."""
        return posixpath.splitext(self.name)[0] if self.kind == SAMPLE_FILE else None

    @property
    def input_name(self) -> str:
        """The name of the folder this unit was found in (an image's input folder, a file's parent)."""
        root = self.path[: -len(self.name)] if self.kind == SAMPLE_FILE else os.path.dirname(self.path)
        return os.path.basename(root.rstrip("/")) or "root"


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
    if not filled.strip("/") or unsafe_name(filled):
        raise ConfigError(f"--key-prefix {mode}: must give a non-empty relative name")


def unsafe_name(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/") or "\\" in name or "\x00" in name


def decode_text(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None
