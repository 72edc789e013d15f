"""Small factories of test data: images, tars. Imported by tests as `from factories import ...`."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

TINY_CLIP = "lafite-tiny"  # bundled 64-d open_clip config; random weights in tests


def image_bytes(color=(200, 30, 30), size=(40, 30), fmt="JPEG", mode="RGB", **save) -> bytes:
    rng = np.random.default_rng(sum(color) + size[0] * 7 + size[1])
    arr = np.clip(np.array(color)[None, None, :] + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def embed_config(inputs, cache: Path, **given):
    """`pipeline embed`'s config for test inputs: lafite-tiny with random weights, 32 px, in-process."""
    from pipeline.embed.config import EmbedConfig

    values = dict(clip_model=TINY_CLIP, clip_pretrained="", image_size=32, workers=0, batch_size=4)
    return EmbedConfig(inputs=tuple(str(i) for i in inputs), cache=cache, **{**values, **given})


def tiny_cache(root: Path, n: int = 16) -> Path:
    """A synthetic-world cache at 32 px under `root` (embed only, lafite-tiny with random weights)."""
    from typer.testing import CliRunner

    from cli.pipeline import app

    for args in (
        ["synth", "--out", root / "w", "--n", n, "--shard-size", 8, "--n-captions", 40, "--image-size", 32],
        ["embed", f"{root / 'w'}/*.tar", "--cache", root / "c", "--clip-model", TINY_CLIP]
        + ["--clip-pretrained", "", "--image-size", 32, "--workers", 0],
    ):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return root / "c"


# A pipeline.toml for a synthetic world in world/ (tars + captions.parquet), cache in cache/.
RUN_CONFIG = f"""
cache = "cache"
[embed]
inputs = ["world/*.tar"]
clip_model = "{TINY_CLIP}"
clip_pretrained = ""
image_size = 32
workers = 0
batch_size = 16
[retrieve]
captions = ["world/captions.parquet"]
k = 4
[optimize]
steps = 3
batch_size = 16
"""


def flip_middle(path: Path, n: int = 16) -> None:
    """Bit rot: n bytes in the middle of the file change; its size and mtime stay the same."""
    st = path.stat()
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + n] = bytes(b ^ 0xFF for b in raw[mid : mid + n])
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
