"""Loading a torch file the user named on the command line (a checkpoint, a probe, CLIP weights).

`load_torch_file(path, flag)` is `torch.load(path, map_location="cpu", weights_only=True)` whose every
failure is one `ConfigError` line naming the flag, the file and what is wrong with it: not a file, empty,
truncated (an interrupted download or copy), some other kind of file (an image, an HTML error page, a
plain pickle, a TorchScript archive), or a pickle holding Python objects the safe loader refuses. A file
whose first bytes are not a torch format is refused before torch reads it, since torch's own messages for
them are many lines about `weights_only` that do not say what the file is. `load_torchscript_file` is the
same for TorchScript archives (`torch.jit.load`).
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from core.errors import ConfigError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
PICKLE_PROTOCOL = 0x80  # torch.save(..., _use_new_zipfile_serialization=False): a pickle, protocol >= 2
# The legacy format starts with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2, LONG1).
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
OTHER_KINDS = (  # leading bytes -> what the file is instead
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP image?)"),
    (b"\x1f\x8b", "a gzip file (unpack it first)"),
    (b"\x93NUMPY", "a numpy .npy array"),
    (b"%PDF", "a PDF"),
)


def _read_head(path: Path, flag: str, expect: str) -> bytes:
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: a directory, not {expect}")
    try:
        with open(path, "rb") as f:
            return f.read(64)
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror})") from None


def _not_torch(head: bytes, expect: str) -> str | None:
    """What is wrong with a file that is not in a torch format, from its first bytes; None when it may be."""
    if not head:
        return "an empty file (an interrupted download or copy?)"
    if head.startswith(ZIP_MAGIC) or head[0] == PICKLE_PROTOCOL:
        return None
    return f"{kind}, not {expect}" if (kind := _kind_of(head)) else f"not {expect} (it starts {head[:8]!r})"


def _kind_of(head: bytes) -> str | None:
    """What kind of file it is instead, for the common mistakes."""
    for magic, kind in OTHER_KINDS:
        if head.startswith(magic):
            return kind
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download saved as the file?)"
    if text.startswith((b"{", b"[")):
        return "a JSON file"
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (run `git lfs pull`)"
    return None


def _zip_problem(path: Path, expect: str) -> str | None:
    """None for a readable zip; what is wrong otherwise (reads only the archive's directory)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "truncated or damaged (a zip archive without its end: an interrupted download or copy?)"
    if not any(name.endswith("data.pkl") for name in names):
        return f"a zip archive, not {expect}"
    return None


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _pickles_cut_short(path: Path, count: int = 5) -> bool:
    """Whether one of the legacy format's leading pickles (magic, protocol, sys info, the object, storage
    keys) ends before its STOP opcode: a truncated file, which the safe loader reports as a refused
    (cut-off) global. Walks the opcodes without running them."""
    import pickletools

    try:
        with open(path, "rb") as f:
            for _ in range(count):
                for _op in pickletools.genops(f):
                    pass
    except ValueError:  # "pickle exhausted before seeing STOP", and cut-off arguments
        return True
    return False


def _describe_load_error(e: Exception) -> str:
    """torch.load's exception -> what is wrong, one line."""
    message = str(e)
    if isinstance(e, EOFError) or any(
        sign in message for sign in ("Ran out of input", "truncated", "central directory", "unexpected EOF")
    ):
        return "truncated or damaged (an interrupted download or copy?)"
    if "Weights only load failed" in message:
        needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        if needed is None:  # a pickle opcode the safe loader never accepts: not torch.save's output
            return "not a torch checkpoint (a pickle torch.save did not write)"
        return (
            f"holds Python objects the safe loader (torch.load weights_only=True) refuses (it needs "
            f"{needed.group(1)}); re-save it as a dict of tensors and plain values"
        )
    if "Invalid magic number" in message or "invalid load key" in message:
        return "not a torch checkpoint (a plain pickle?)"
    first_line = message.strip().splitlines()[0] if message.strip() else ""
    return f"not a readable torch checkpoint ({type(e).__name__}: {first_line})"


def load_torch_file(path: Path | str, flag: str, *, expect: str = "a torch checkpoint", mmap: bool = False):
    """`torch.load` on the CPU with the safe unpickler; every failure is a one-line ConfigError naming
    `flag`, the file and what is wrong. `mmap=True` maps a zip-format file instead of reading it (cheap:
    for checking a large file that something else loads). `.safetensors` files load with safetensors."""
    import torch

    path = Path(path)
    head = _read_head(path, flag, expect)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, flag)
    problem = _not_torch(head, expect)
    if problem is not None:
        raise ConfigError(f"{flag} {path}: {problem}")
    if head.startswith(ZIP_MAGIC):
        problem = _zip_problem(path, expect)
        if problem is None and _is_torchscript(path):
            problem = "a TorchScript archive (torch.jit.save), not a checkpoint of tensors"
        if problem is not None:
            raise ConfigError(f"{flag} {path}: {problem}")
    elif not (head.startswith(LEGACY_TORCH_MAGIC) or LEGACY_TORCH_MAGIC.startswith(head)):
        raise ConfigError(f"{flag} {path}: not a torch checkpoint (a plain pickle?)")
    try:
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=mmap and head.startswith(ZIP_MAGIC)
        )
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        if not head.startswith(ZIP_MAGIC) and _pickles_cut_short(path):
            raise ConfigError(f"{flag} {path}: truncated (an interrupted download or copy?)") from None
        raise ConfigError(f"{flag} {path}: {_describe_load_error(e)}") from None


def _load_safetensors(path: Path, flag: str) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConfigError(
            f"{flag} {path}: reading .safetensors files needs `pip install safetensors`"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{flag} {path}: not a readable safetensors file ({first_line})") from None


def load_torchscript_file(path: Path | str, flag: str, *, expect: str = "a TorchScript archive"):
    """`torch.jit.load` on the CPU, with the same one-line errors as `load_torch_file`."""
    import torch

    path = Path(path)
    head = _read_head(path, flag, expect)
    problem = _not_torch(head, expect)
    if problem is None and not head.startswith(ZIP_MAGIC):
        problem = f"a pickle, not {expect}"
    if problem is not None:
        raise ConfigError(f"{flag} {path}: {problem}")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{flag} {path}: truncated or damaged (an interrupted download or copy?)")
    if not _is_torchscript(path):
        raise ConfigError(f"{flag} {path}: a checkpoint of tensors, not {expect} (a TorchScript archive)")
    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice is not the user's to act on
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - RuntimeError for a damaged archive, and more
        raise ConfigError(f"{flag} {path}: {_describe_load_error(e)}") from None
