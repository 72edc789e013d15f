"""The synthetic world: a deterministic image set with known labels and an independent caption corpus.

Each image holds one or two flat-coloured shapes on a low-saturation background; its labels are the
objects' shape, colour, size and position.

Captions (`caption_style`). `partial`, the default: each image has `captions_per_image` captions (5, as
COCO), each stating a random non-empty subset of each object's attributes, and no caption ever names the
background, so images hold more than their captions say. That information imbalance is what gives a
CLIP trained on such pairs a modality gap like a real one's (Schrodi et al. 2025, "Two Effects, One
Trigger"); the caption corpus is partial in the same way. `full`: the former world, one caption per image
naming all four attributes of every object, byte-identical to what earlier versions rendered, so their
numbers can be reproduced. The images themselves are the same in both.

Its language (vocabulary, caption templates and their exact inverse `parse_caption`, the caption corpus)
is world/grammar.py; this module renders scenes and writes the world. A few (colour, shape)
pairs never appear in an image but do appear in the caption corpus (`HELD_OUT_PAIRS`), as DESIGN asks.

Output (img2dataset-style): `out/{i:05d}.tar` WebDataset shards with `{key}.jpg`, `{key}.txt` (the
first caption) and `{key}.json` (labels; in the partial world `captions` lists all of them), plus
`out/captions.parquet` and `out/captions.txt` (the corpus, text only). The same config gives
byte-identical files.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError
from core.tars import add_member
from manifests import atomic_write, write_bytes_atomic, write_parquet_atomic
from world.grammar import (
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    caption_corpus,
    make_caption,
    partial_objects,
    sample_objects,
)

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


# Object colours are saturated and at least ~20 degrees of hue apart; backgrounds (below) are
# near-grey, so no background can be read as an object colour.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 128, 20),
    "yellow": (240, 210, 25),
    "green": (35, 165, 60),
    "blue": (35, 85, 225),
    "purple": (140, 55, 190),
}
BACKGROUND_TINTS: dict[str, dict[str, tuple[int, int, int]]] = {
    "light": {
        "paper": (236, 234, 228),
        "mist": (220, 225, 230),
        "sand": (228, 222, 208),
        "sage": (218, 226, 218),
        "silver": (200, 200, 202),
    },
    "dark": {
        "charcoal": (36, 36, 38),
        "slate": (44, 50, 60),
        "umber": (54, 47, 42),
        "pine": (34, 46, 40),
        "graphite": (64, 64, 64),
    },
}
GRADIENT_DIRECTIONS: tuple[str, ...] = ("vertical", "horizontal", "diagonal")

# Geometry as fractions of the image side. Anchors are 0.32 apart along x or y, and a large object spans
# at most 2 * 1.05 * 0.145 = 0.305, so two objects at different positions never touch.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.18, 0.5),
    "right": (0.82, 0.5),
    "top": (0.5, 0.18),
    "bottom": (0.5, 0.82),
    "centre": (0.5, 0.5),
}
SIZE_RADII: dict[str, tuple[float, float]] = {"small": (0.08, 0.09), "large": (0.13, 0.145)}
_EXTENT = 1.05  # the star's points reach 1.05 r; every other shape stays within r of its centre
_JITTER = 0.015  # position jitter, small enough that the anchor stays unambiguous
_SUPERSAMPLE = 4  # render at 4x and box-downsample: clean antialiased edges at 64 px

# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------

MAX_IMAGES = 999_999_999  # keys are 9 digits
MAX_SHARDS = 100_000  # shard names are 5 digits
CAPTION_STYLES = ("partial", "full")
CAPTIONS_PER_IMAGE = {"partial": 5, "full": 1}  # the default of each style


@dataclass(frozen=True)
class SynthConfig:
    out: Path  # output directory: shards, captions.parquet, captions.txt
    n: int = 2000  # images
    seed: int = 0  # one seed drives both the images and the (independent) caption corpus
    image_size: int = 64  # pixels per side
    max_objects: int = 2  # 1 or 2 objects per image (and per corpus caption)
    shard_size: int = 500  # images per tar shard
    n_captions: int = 20000  # size of the independent caption corpus
    caption_style: str = "partial"  # partial: captions name some attributes; full: the former world
    captions_per_image: int | None = None  # None: 5 for partial, 1 for full

    def validate(self) -> None:
        """Raise ConfigError naming the flag for the first bad value; checks --out against the disk too."""
        _check_int("--n", self.n, 1, MAX_IMAGES, "(keys are 9 digits)")
        _check_int("--seed", self.seed, 0, 2**63 - 1)
        _check_int("--image-size", self.image_size, 16, 1024)
        _check_int("--max-objects", self.max_objects, 1, 2)
        _check_int("--shard-size", self.shard_size, 1, MAX_IMAGES)
        if self.caption_style not in CAPTION_STYLES:
            raise ConfigError(
                f"--caption-style must be one of {', '.join(CAPTION_STYLES)}, got {self.caption_style!r}"
            )
        _check_int("--captions-per-image", self.per_image, 1, 100)
        if self.caption_style == "full" and self.per_image != 1:
            raise ConfigError(
                "--captions-per-image: the full world has one caption per image (it is the former one)"
            )
        if self.n_shards > MAX_SHARDS:
            raise ConfigError(
                f"--shard-size {self.shard_size} makes {self.n_shards} shards for --n {self.n}; "
                f"at most {MAX_SHARDS} are allowed, raise --shard-size"
            )
        n_pairs = len(COLOURS) * len(SHAPES)
        _check_int("--n-captions", self.n_captions, n_pairs, 100_000_000,
                   f"(the corpus must cover all {n_pairs} colour-shape pairs)")  # fmt: skip
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; pass a directory")
        if out.is_dir():
            stale = sorted(p.name for p in out.glob("*.tar") if _is_stale_shard(p.name, self.n_shards))
            if stale:
                raise ConfigError(
                    f"--out {out} holds shards from a larger run ({stale[0]}...); "
                    "remove them or pass another --out"
                )

    @property
    def n_shards(self) -> int:
        return -(-self.n // self.shard_size)

    @property
    def per_image(self) -> int:
        """Captions per image: --captions-per-image, or its style's default."""
        given = self.captions_per_image
        return CAPTIONS_PER_IMAGE.get(self.caption_style, 1) if given is None else given


def _check_int(flag: str, value: Any, lo: int, hi: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        suffix = f" {why}" if why else ""
        raise ConfigError(f"{flag} must be an integer between {lo} and {hi}{suffix}, got {value!r}")


def _is_stale_shard(name: str, n_shards: int) -> bool:
    stem = name[: -len(".tar")]
    return len(stem) == 5 and stem.isdigit() and int(stem) >= n_shards


# ---------------------------------------------------------------------------------------------------------
# Scenes and captions
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    objects: list[dict[str, str]]  # [{"shape", "colour", "size", "position"}], in drawing order
    boxes: list[tuple[float, float, float, float]]  # per object: x0, y0, x1, y1 as fractions of the side
    background: dict[str, Any]  # {"tone", "style", "tints", "direction", "noise"}
    caption: str  # the first caption (`{key}.txt`)
    captions: tuple[str, ...] = ()  # the partial world's captions, `caption` first; () in the full world

    def labels(self) -> dict[str, Any]:
        """The `{key}.json` payload."""
        labels = {
            "objects": self.objects,
            "boxes": [list(b) for b in self.boxes],
            "background": self.background,
            "caption": self.caption,
        }
        if self.captions:
            labels["captions"] = list(self.captions)
        return labels


def sample_scene(
    seed: int, index: int, max_objects: int = 2, caption_style: str = "full", per_image: int = 1
) -> Scene:
    """The scene of image `index`: a pure function of (seed, index), so shards can be made in any order.
    The partial world's captions come from a stream of their own, so its scenes are the full world's."""
    rng = random.Random(f"synth/image/{seed}/{index}")  # str seeds hash with sha512: stable across runs
    objects = sample_objects(rng, max_objects)
    boxes = _place(objects, rng)
    tone = rng.choice(("light", "dark"))
    tints = list(BACKGROUND_TINTS[tone])
    if rng.random() < 0.4:
        background = {"tone": tone, "style": "flat", "tints": [rng.choice(tints)], "direction": None}
    else:
        background = {"tone": tone, "style": "gradient", "tints": rng.sample(tints, 2),
                      "direction": rng.choice(GRADIENT_DIRECTIONS)}  # fmt: skip
    background["noise"] = round(rng.uniform(0.0, 5.0), 2)  # std of per-pixel noise, in 0..255 units
    scene = Scene(objects=objects, boxes=boxes, background=background, caption=make_caption(objects, rng))
    if caption_style == "full":
        return scene
    captions = partial_captions(objects, random.Random(f"synth/captions/{seed}/{index}"), per_image)
    return dataclasses.replace(scene, caption=captions[0], captions=tuple(captions))


def partial_captions(objects: list[dict[str, str]], rng: random.Random, n: int) -> list[str]:
    """n captions of `objects`, each stating a fresh random subset of their attributes."""
    return [make_caption(partial_objects(objects, rng), rng) for _ in range(n)]


def _place(objects: list[dict[str, str]], rng: random.Random) -> list[tuple[float, float, float, float]]:
    circles = []
    for obj in objects:
        ax, ay = POSITION_ANCHORS[obj["position"]]
        r = rng.uniform(*SIZE_RADII[obj["size"]])
        circles.append([ax, ay, r, rng.uniform(-_JITTER, _JITTER), rng.uniform(-_JITTER, _JITTER)])
    if len(circles) == 2 and _overlap(circles[0], circles[1]):
        for c in circles:  # without jitter the anchors guarantee a gap (see POSITION_ANCHORS)
            c[3] = c[4] = 0.0
    boxes = []
    for ax, ay, r, dx, dy in circles:
        cx, cy, e = ax + dx, ay + dy, r * _EXTENT
        boxes.append((round(cx - e, 4), round(cy - e, 4), round(cx + e, 4), round(cy + e, 4)))
    return boxes


def _overlap(a: list[float], b: list[float], margin: float = 0.01) -> bool:
    reach = (a[2] + b[2]) * _EXTENT + margin
    return abs(a[0] + a[3] - b[0] - b[3]) < reach and abs(a[1] + a[4] - b[1] - b[4]) < reach


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def render_scene(scene: Scene, image_size: int, noise_rng: np.random.Generator) -> Image.Image:
    """Draw the scene at 4x, box-downsample to `image_size`, then add background noise (RGB image)."""
    import numpy as np
    from PIL import Image, ImageDraw

    side = image_size * _SUPERSAMPLE
    canvas = _background(scene.background, image_size)
    mask = Image.new("L", (side, side), 0)
    draw, draw_mask = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    shift = noise_rng.integers(-12, 13, size=(len(scene.objects), 3))  # per-object colour jitter
    for obj, box, rgb_shift in zip(scene.objects, scene.boxes, shift, strict=True):
        cx, cy = (box[0] + box[2]) / 2 * side, (box[1] + box[3]) / 2 * side
        r = (box[2] - box[0]) / 2 / _EXTENT * side
        fill = tuple(int(v) for v in np.clip(np.array(COLOUR_RGB[obj["colour"]]) + rgb_shift, 0, 255))
        angle = float(noise_rng.uniform(-15.0, 15.0))  # only the star turns: its extent is rotation-free
        _draw_shape(draw, obj["shape"], cx, cy, r, fill, angle)
        _draw_shape(draw_mask, obj["shape"], cx, cy, r, 255, angle)
    small = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32)
    # Noise after downsampling (so it survives) and only on the background (objects stay flat).
    background_weight = 1.0 - np.asarray(mask.reduce(_SUPERSAMPLE), dtype=np.float32)[..., None] / 255.0
    noise = noise_rng.normal(0.0, scene.background["noise"], size=small.shape).astype(np.float32)
    pixels = np.clip(np.rint(small + noise * background_weight), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _background(spec: dict[str, Any], image_size: int) -> Image.Image:
    """Background at 4x. Gradients are computed at 1x and upsampled: a float ramp at 4x made a 64 px sample
    cost 2.0 ms instead of 0.9 ms, and the box downsample hides the difference."""
    import numpy as np
    from PIL import Image

    side = image_size * _SUPERSAMPLE
    colours = [np.array(BACKGROUND_TINTS[spec["tone"]][t], dtype=np.float32) for t in spec["tints"]]
    if spec["style"] == "flat":
        return Image.new("RGB", (side, side), tuple(int(v) for v in colours[0]))
    ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
    if spec["direction"] == "vertical":
        t = np.broadcast_to(ramp[:, None], (image_size, image_size))
    elif spec["direction"] == "horizontal":
        t = np.broadcast_to(ramp[None, :], (image_size, image_size))
    else:
        t = (ramp[:, None] + ramp[None, :]) / 2
    pixels = np.rint(colours[0] + (colours[1] - colours[0]) * t[..., None]).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").resize((side, side), Image.Resampling.BILINEAR)


def _draw_shape(draw: Any, shape: str, cx: float, cy: float, r: float, fill: Any, angle: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.88 * r  # a square of half-side r looks heavier than a circle of radius r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - 0.95 * r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)], fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = _EXTENT * r if k % 2 == 0 else 0.45 * r
            theta = math.radians(-90.0 + angle + 36.0 * k)
            points.append((cx + radius * math.cos(theta), cy + radius * math.sin(theta)))
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        t = 0.3 * r  # arm half-thickness: arms stay >= 3 px wide for a small cross at 64 px
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


_PIXEL_STREAM = 1  # numpy stream id for per-image pixel randomness (scene choices use random.Random)


def make_sample(
    seed: int,
    index: int,
    image_size: int = 64,
    max_objects: int = 2,
    caption_style: str = "full",
    per_image: int = 1,
) -> dict[str, Any]:
    """One WebDataset sample: `__key__`, `jpg` (bytes), `txt` (str), `json` (labels dict)."""
    import numpy as np

    scene = sample_scene(seed, index, max_objects, caption_style, per_image)
    image = render_scene(scene, image_size, np.random.default_rng([seed, _PIXEL_STREAM, index]))
    buffer = io.BytesIO()
    # 4:4:4 chroma keeps small coloured shapes from bleeding into the background at 64 px.
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return {"__key__": f"{index:09d}", "jpg": buffer.getvalue(), "txt": scene.caption, "json": scene.labels()}


# ---------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------


def write_shard(
    config: SynthConfig, shard_index: int, on_image: Callable[[], None] | None = None
) -> tuple[Path, int]:
    """Write shard `shard_index` atomically; returns (path, number of objects drawn). Idempotent."""
    start = shard_index * config.shard_size
    stop = min(start + config.shard_size, config.n)
    path = Path(config.out) / f"{shard_index:05d}.tar"
    n_objects = 0

    with atomic_write(path) as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(start, stop):
            sample = make_sample(
                config.seed,
                index,
                config.image_size,
                config.max_objects,
                config.caption_style,
                config.per_image,
            )
            key = sample["__key__"]
            n_objects += len(sample["json"]["objects"])
            add_member(tar, f"{key}.jpg", sample["jpg"])
            add_member(tar, f"{key}.txt", sample["txt"].encode("utf-8"))
            add_member(tar, f"{key}.json", json.dumps(sample["json"], sort_keys=True).encode("utf-8"))
            if on_image is not None:
                on_image()
    return path, n_objects


def write_caption_corpus(config: SynthConfig) -> tuple[Path, Path, list[str]]:
    """Write `captions.parquet` (one string column `caption`) and `captions.txt`, both atomically."""
    import pyarrow as pa

    partial = config.caption_style == "partial"
    captions = caption_corpus(config.seed, config.n_captions, config.max_objects, partial)
    out = Path(config.out)
    schema = pa.schema([pa.field("caption", pa.string(), nullable=False)])
    table = pa.table({"caption": pa.array(captions, type=pa.string())}, schema=schema)
    parquet_path, txt_path = out / "captions.parquet", out / "captions.txt"
    write_parquet_atomic(parquet_path, table)
    write_bytes_atomic(txt_path, "".join(c + "\n" for c in captions).encode("utf-8"))
    return parquet_path, txt_path, captions


@dataclass(frozen=True)
class SynthResult:
    shards: list[Path]  # out/{i:05d}.tar in shard order
    captions_parquet: Path  # out/captions.parquet, one string column `caption`
    captions_txt: Path  # out/captions.txt, the same captions one per line
    n_images: int
    n_objects: int  # objects drawn over all images (n_images..2 * n_images)
    n_captions: int  # corpus rows
    n_unique_captions: int  # distinct corpus rows (duplicates are allowed, but rare)
    held_out_pairs: tuple[tuple[str, str], ...] = HELD_OUT_PAIRS  # (colour, shape) in the corpus only


def run_synth(config: SynthConfig, progress: Callable[[int], None] | None = None) -> SynthResult:
    """Validate, write every shard, then the caption corpus. `progress(n_done_images)` after each image."""
    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    done = 0

    def on_image() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done)

    shards, n_objects = [], 0
    for shard_index in range(config.n_shards):
        path, shard_objects = write_shard(config, shard_index, on_image)
        shards.append(path)
        n_objects += shard_objects
    parquet_path, txt_path, captions = write_caption_corpus(config)
    return SynthResult(
        shards=shards,
        captions_parquet=parquet_path,
        captions_txt=txt_path,
        n_images=config.n,
        n_objects=n_objects,
        n_captions=len(captions),
        n_unique_captions=len(set(captions)),
    )
