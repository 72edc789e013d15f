"""Turn raw image bytes from any source into the clean RGB image stored in the feature cache.

Used by the embed stage inside DataLoader workers, so everything here is a pure module-level function of
bytes (picklable, no global state touched) and every per-sample failure raises
`SampleSkipped(reason, detail)` instead of crashing. Skip reasons:

- `empty`: zero bytes.
- `undecodable`: not an image, an unsupported format, a corrupt header or corrupt pixel data.
- `truncated`: the header parses but the pixel data stops early.
- `too_many_pixels`: width * height over `max_pixels` (read from the header, before decoding pixels).
- `extreme_aspect` (`prepare_image` only): long side / short side over `max_aspect` (from the header, before
  decoding pixels). The square centre crop would keep too little: of a 1x60000 strip, one pixel.
- `unencodable` (`prepare_image` only): the target format cannot hold the image (WebP is limited to
  16383 px a side, which only `image_size=0` can reach).

Conversion labels, in the order applied (`PreparedImage.converted` joins them with commas):
`animated` (first frame kept), `exif_rotated`, `16bit`, `greyscale`, `palette`, `alpha`, `cmyk`, `ycbcr`,
or the lower-cased PIL mode for anything rarer (e.g. `lab`, `hsv`).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from core.errors import SampleSkipped
from inputs.limits import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, IMAGE_FORMATS

# The PIL format name of each format `prepare_image` can store (IMAGE_FORMATS), which lets the source bytes
# be kept as they are.
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}

SKIP_REASONS = ("empty", "undecodable", "truncated", "too_many_pixels", "extreme_aspect", "unencodable")

# Formats tried by content, most common first. An allowlist, not PIL's full registry: PIL would also
# open EPS (by running Ghostscript on untrusted input), PSD, FITS..., and formats with weak magic
# numbers (TGA) that can take random bytes for an image.
_DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "AVIF", "MPO")
_DRAFT_FORMATS = ("JPEG", "MPO")

_WHITE = (255, 255, 255)
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that undoes it (the table ImageOps.exif_transpose uses).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the cache: the bytes to store and the pixels CLIP should see."""

    data: bytes  # encoded image to store (the untouched source bytes when they were already right)
    ext: str  # "jpg" | "png" | "webp": the format of `data`
    width: int  # of the ORIGINAL image, after EXIF rotation
    height: int
    # uint8 [H, W, 3] RGB at the stored size: `data` decoded, so CLIP sees exactly what trainers will load.
    # Left out of ==/hash/repr: arrays have no truth value, and `data` already determines it.
    pixels: np.ndarray = field(compare=False, repr=False)
    converted: str | None = None  # comma-joined conversion labels, None when the source was clean


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, list[str]]:
    """Decode `data` by content (names and extensions play no part) into an 8-bit RGB image.

    Returns the image (fully loaded, EXIF orientation applied, `info` emptied so no metadata leaks into
    re-encodes) and the conversion labels. Raises `SampleSkipped` with one of the reasons above.
    """
    rgb, labels, _, _ = _decode(data, max_pixels=max_pixels)
    return rgb, labels


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to `size` x `size`; returns `img` itself when already that size."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    width, height = img.size
    if (width, height) == (size, size):
        return img
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # crop() then resize(), not resize(box=...): with a box, Pillow's filter also reads the pixels just
    # outside it, so colour from the cut-off sides bleeds into the edge columns.
    square = img.crop((left, top, left + side, top + side)) if width != height else img
    # Lanczos for quality; reducing_gap=3.0 first shrinks by an integer factor with a box filter, which
    # Pillow documents as indistinguishable from plain Lanczos and is 2x faster (49 ms vs 103 ms for a
    # 4000x3000 JPEG to 256 px, decode included, on this machine's CPU).
    return square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_image(img: Image.Image, ext: str, quality: int = 95) -> bytes:
    """Encode `img` (RGB) as `ext`; the same pixels give the same bytes. Only pixels are written.

    `quality` applies to jpg and webp (lossy); png is lossless and ignores it.
    """
    if ext not in _PIL_FORMAT:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {ext!r}")
    if img.info:
        # PIL's PNG and JPEG writers copy some of `img.info` (ICC profile, tRNS transparency, comment)
        # into the file; the stored image must depend on its pixels alone.
        img = img.copy()
        img.info.clear()
    if ext == "jpg":
        # 4:4:4: chroma subsampling halves colour resolution, which at 64-256 px smears the colour of
        # small objects (the attribute the synthetic world measures). optimize: smaller Huffman tables,
        # lossless and deterministic.
        params = {"quality": quality, "subsampling": 0, "optimize": True}
    elif ext == "png":
        params = {"compress_level": 6}
    else:
        params = {"quality": quality, "method": 4, "lossless": False}
    buf = io.BytesIO()
    img.save(buf, format=_PIL_FORMAT[ext], **params)
    return buf.getvalue()


def prepare_image(
    data: bytes,
    *,
    image_size: int,
    image_format: str = "jpg",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    quality: int = 95,
) -> PreparedImage:
    """Decode, centre-crop to `image_size` (0 keeps the original size) and encode as `image_format`.

    An image whose long side / short side exceeds `max_aspect` is skipped, whatever `image_size`: CLIP
    always sees the square centre crop.

    The source bytes are stored unchanged (no generation loss) when they are already a clean 8-bit RGB
    image in the target format at the target size; otherwise the image is re-encoded.
    """
    if image_format not in _PIL_FORMAT:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if image_size < 0:
        raise ValueError(f"image_size must be >= 0 (0 keeps the original size), got {image_size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")

    rgb, labels, (width, height), source_format = _decode(
        data, max_pixels=max_pixels, max_aspect=max_aspect, draft_size=image_size
    )
    right_size = image_size == 0 or rgb.size == (image_size, image_size)
    if not labels and right_size and source_format == _PIL_FORMAT[image_format]:
        return PreparedImage(data, image_format, width, height, _to_array(rgb), None)

    out = rgb if image_size == 0 else fit_square(rgb, image_size)
    try:
        encoded = encode_image(out, image_format, quality)
    except (OSError, ValueError) as e:
        raise SampleSkipped("unencodable", f"{image_format} {out.size[0]}x{out.size[1]}: {e}") from None
    # Lossy formats: decode what was stored, so CLIP embeds the pixels trainers will see.
    pixels = _to_array(out) if image_format == "png" else _to_array(Image.open(io.BytesIO(encoded)))
    return PreparedImage(encoded, image_format, width, height, pixels, ",".join(labels) or None)


def _decode(
    data: bytes, *, max_pixels: int, max_aspect: float | None = None, draft_size: int = 0
) -> tuple[Image.Image, list[str], tuple[int, int], str | None]:
    """decode_rgb, plus the original (EXIF-rotated) size and PIL's format name.

    `max_aspect` None is no limit (decode_rgb: the limit is about the crop `prepare_image` makes).

    `draft_size` > 0 lets JPEG decode at a reduced scale (libjpeg DCT scaling, 1/2 to 1/8) that leaves the
    short side >= 2 * draft_size, so Lanczos still does the last >= 2x of the reduction: 6x faster for a
    4000x3000 JPEG to 256 px (17 ms vs 103 ms on this machine's CPU), >= 53 dB PSNR against a full decode
    with the same fit_square. Asking for only 1 x draft_size is 9x faster but drops to 24 dB on sharp
    diagonal edges (DCT scaling aliases).
    """
    if not data:
        raise SampleSkipped("empty")
    try:
        img = Image.open(io.BytesIO(data), formats=_decode_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's own guard fires inside open(): always at 2 x Image.MAX_IMAGE_PIXELS (179 MP by default,
        # which caps a larger max_pixels), and at 1 x as a warning only if warnings are made errors.
        raise SampleSkipped("too_many_pixels", str(e)) from None
    except Exception as e:  # PIL raises many types for bad headers (OSError, SyntaxError, ValueError...)
        reason = "truncated" if _riff_is_short(data) else "undecodable"
        raise SampleSkipped(reason, f"{type(e).__name__}: {e}") from None

    width, height = img.size
    if width * height > max_pixels:
        raise SampleSkipped("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")
    long_side, short_side = max(width, height), min(width, height)
    if max_aspect is not None and long_side > max_aspect * short_side:  # EXIF rotation keeps the ratio
        aspect = f"{round(long_side / max(short_side, 1), 1):g}"  # max(): a header may declare a 0-px side
        detail = f"{width}x{height}: aspect {aspect}:1 > --max-aspect {max_aspect:g}"
        raise SampleSkipped("extreme_aspect", detail)

    labels: list[str] = []
    try:
        if getattr(img, "is_animated", False):  # must be asked before load(): GIF seeks to frame 1 and back
            labels.append("animated")
    except Exception as e:
        raise SampleSkipped("undecodable", f"frames: {type(e).__name__}: {e}") from None
    high_depth = ";16" in _rawmode(img)  # 16-bit RGB(A) PNG/TIFF decode straight to 8-bit "RGB"/"RGBA"
    if draft_size and img.format in _DRAFT_FORMATS:
        img.draft(None, (2 * draft_size, 2 * draft_size))

    # Force the full pixel decode now, so a truncated file fails here and not later in a transform.
    # This relies on PIL's default ImageFile.LOAD_TRUNCATED_IMAGES = False; nothing here sets it.
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleSkipped("too_many_pixels", str(e)) from None
    except Exception as e:
        reason = "truncated" if isinstance(e, EOFError) or "truncated" in str(e).lower() else "undecodable"
        raise SampleSkipped(reason, f"{type(e).__name__}: {e}") from None
    if getattr(img, "_ended", False):
        # Some other library set LOAD_TRUNCATED_IMAGES = True globally; PIL's JPEG reader then pads a
        # cut file with a fake end marker and records it in `_ended`. Other formats cannot be told apart.
        raise SampleSkipped("truncated", "JPEG data ended early (LOAD_TRUNCATED_IMAGES is set globally)")

    orientation = _exif_orientation(img)
    try:
        rgb = _to_rgb(img, labels, high_depth)
    except Exception as e:
        raise SampleSkipped("undecodable", f"mode {img.mode}: {type(e).__name__}: {e}") from None
    if orientation in _ORIENTATION_TRANSPOSE:
        # Transposing the 8-bit RGB result is cheaper than the source (16-bit, CMYK, alpha...).
        labels.insert(1 if "animated" in labels else 0, "exif_rotated")
        rgb = rgb.transpose(_ORIENTATION_TRANSPOSE[orientation])
        if orientation >= 5:
            width, height = height, width
    rgb.info = {}  # PIL copies info through convert/resize; keep ICC profiles, comments out of re-encodes
    return rgb, labels, (width, height), img.format


def _to_rgb(img: Image.Image, labels: list[str], high_depth: bool) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, appending what was done to `labels`; transparency -> white."""
    mode = img.mode
    transparency = img.info.get("transparency")
    if high_depth and mode not in _HIGH_DEPTH_MODES:
        labels.append("16bit")
    if mode == "RGB" and transparency is None:
        return img
    if mode in _HIGH_DEPTH_MODES:
        labels += ["16bit", "greyscale"]
        grey = _high_depth_to_uint8(np.asarray(img))
        if isinstance(transparency, int):  # a tRNS grey value in 16-bit units
            labels.append("alpha")
            grey[np.asarray(img) == transparency] = 255
        return Image.fromarray(grey).convert("RGB")
    if mode in ("P", "PA"):
        labels.append("palette")
        if mode == "PA" or transparency is not None:
            labels.append("alpha")
            return _composite_on_white(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("L", "LA", "La", "1"):
        labels.append("greyscale")
    if mode in ("RGBA", "RGBa", "LA", "La") or transparency is not None:
        labels.append("alpha")  # includes RGB/L with a tRNS colour key
        return _composite_on_white(img.convert("RGBA"))
    if mode not in ("L", "1"):
        labels.append(mode.lower())  # cmyk, ycbcr, or something rarer (lab, hsv)
    # CMYK: a plain formula, no ICC colour management (like img2dataset); PIL already undoes the
    # inverted CMYK that Adobe writes.
    return img.convert("RGB")


def _high_depth_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale 16-bit (or 32-bit int / float) greyscale to uint8.

    PIL's own convert("L") clips instead of scaling (65535 -> 255, but so does 256), hence numpy.
    Integers in 0..65535 are 16-bit data: round(v * 255 / 65535), so 65535 -> 255 and 32768 -> 128.
    Floats in 0..1 scale by 255; any other range is stretched min..max.
    """
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(arr * 255.0).astype(np.uint8)
        return _stretch(arr, lo, hi)
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 65535:
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return _stretch(arr.astype(np.float64), lo, hi)


def _stretch(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation; 1 when absent or unreadable (bad metadata is no reason to skip)."""
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1


def _rawmode(img: Image.Image) -> str:
    """The raw mode of the first tile before load ("RGB;16B" for a 16-bit PNG), or ""."""
    try:
        args = img.tile[0].args
        rawmode = args[0] if isinstance(args, tuple) else args
        return rawmode if isinstance(rawmode, str) else ""
    except Exception:
        return ""


def _riff_is_short(data: bytes) -> bool:
    """True for a WebP whose RIFF header declares more bytes than there are: PIL's WebP reader decodes
    at open() and cannot tell a cut file from a corrupt one."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return len(data) < int.from_bytes(data[4:8], "little") + 8


def _to_array(img: Image.Image) -> np.ndarray:
    # np.array, not np.asarray: PIL's array interface gives a read-only view, which torch.from_numpy
    # warns about in the DataLoader collate.
    return np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)


@functools.cache
def _decode_formats() -> tuple[str, ...]:
    """The allowlisted formats this Pillow build can open (Image.open raises KeyError on unknown names)."""
    Image.init()
    return tuple(name for name in _DECODE_FORMATS if name in Image.OPEN)
