"""inputs.images: any bytes to clean RGB, skip reasons, crop and resize, the keep-source-bytes rule."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from core.errors import SampleSkipped
from inputs.images import (
    SKIP_REASONS,
    PreparedImage,
    decode_rgb,
    encode_image,
    fit_square,
    prepare_image,
)
from inputs.limits import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ---------------------------------------------------------------- fixture factories


def to_bytes(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def noise_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth-ish random colours: compresses to a realistic size, so truncation cuts real pixel data."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 4, 1), max(width // 4, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): arr is uint16 [H, W] or [H, W, C]."""
    height, width = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return to_bytes(img, "JPEG", quality=95, exif=exif)


def skip_reason(data: bytes, **kwargs) -> str:
    with pytest.raises(SampleSkipped) as info:
        decode_rgb(data, **kwargs)
    return info.value.reason


def close(actual, expected, tol: int = 6) -> bool:
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected, strict=True))


# ---------------------------------------------------------------- skip reasons


def test_skip_reason_strings_are_the_documented_ones():
    assert SKIP_REASONS == (
        "empty",
        "undecodable",
        "truncated",
        "too_many_pixels",
        "extreme_aspect",
        "unencodable",
    )
    assert DEFAULT_MAX_PIXELS == 64_000_000 and DEFAULT_MAX_ASPECT == 10


def test_zero_bytes_is_empty():
    assert skip_reason(b"") == "empty"


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"not an image at all",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 5,  # PNG signature, then a broken header
        b"\xff\xd8\xff",  # JPEG magic and nothing else
    ],
    ids=["random", "text", "png-bad-header", "jpeg-magic-only"],
)
def test_non_images_are_undecodable(data):
    assert skip_reason(data) == "undecodable"


def test_eps_is_not_opened_so_ghostscript_never_runs(monkeypatch):
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append(args))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(SampleSkipped) as info:
        prepare_image(eps, image_size=8)
    assert info.value.reason == "undecodable" and calls == []


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_cut_in_half_is_truncated(fmt):
    data = to_bytes(noise_rgb(96, 64), fmt)
    decode_rgb(data)  # the whole file is fine
    assert skip_reason(data[: len(data) // 2]) == "truncated"


def test_truncated_jpeg_detected_even_if_someone_set_load_truncated_images(monkeypatch):
    data = to_bytes(noise_rgb(96, 64), "JPEG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert skip_reason(data[: len(data) // 2]) == "truncated"


def test_decoding_leaves_pil_globals_alone():
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    data = to_bytes(noise_rgb(96, 64), "JPEG")
    decode_rgb(data)
    skip_reason(data[:300])
    skip_reason(to_bytes(noise_rgb(20, 20), "PNG"), max_pixels=100)
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) == before


def test_corrupt_pixel_data_is_undecodable_not_a_crash():
    data = bytearray(to_bytes(noise_rgb(64, 64), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = b"\xaa" * 50  # garbage inside the zlib stream, length intact
    assert skip_reason(bytes(data)) in ("undecodable", "truncated")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_every_cut_point_gives_an_image_or_a_sample_skipped(fmt):
    data = to_bytes(noise_rgb(48, 40), fmt)
    for end in range(0, len(data), max(len(data) // 40, 1)):
        try:
            rgb, _ = decode_rgb(data[:end])
        except SampleSkipped as e:
            assert e.reason in SKIP_REASONS
        else:
            assert rgb.mode == "RGB"


def test_random_byte_flips_give_an_image_or_a_sample_skipped():
    rng = np.random.default_rng(7)
    sources = [to_bytes(noise_rgb(48, 40), fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF")]
    for trial in range(120):
        data = bytearray(sources[trial % len(sources)])
        for pos in rng.integers(0, len(data), 4):
            data[pos] = int(rng.integers(0, 256))
        try:
            rgb, _ = decode_rgb(bytes(data))
        except SampleSkipped as e:
            assert e.reason in SKIP_REASONS
        else:
            assert rgb.mode == "RGB"


def test_over_max_pixels_is_skipped_from_the_header():
    data = to_bytes(Image.new("RGB", (20, 20), RED), "PNG")
    assert skip_reason(data, max_pixels=100) == "too_many_pixels"
    assert skip_reason(data, max_pixels=399) == "too_many_pixels"
    rgb, _ = decode_rgb(data, max_pixels=400)  # the limit itself is allowed
    assert rgb.size == (20, 20)


def test_pil_decompression_bomb_error_is_too_many_pixels(monkeypatch):
    data = to_bytes(Image.new("RGB", (20, 20), RED), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 px > 2 x 100: PIL raises in open()
    assert skip_reason(data, max_pixels=10_000) == "too_many_pixels"


def test_pil_decompression_bomb_warning_is_too_many_pixels_when_warnings_are_errors(monkeypatch):
    data = to_bytes(Image.new("RGB", (20, 20), RED), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 300 < 400 px < 600: only a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert skip_reason(data, max_pixels=10_000) == "too_many_pixels"
    with pytest.warns(Image.DecompressionBombWarning):
        rgb, _ = decode_rgb(data, max_pixels=10_000)  # our own limit decides
    assert rgb.size == (20, 20)


def test_webp_too_wide_for_the_format_is_unencodable():
    data = to_bytes(Image.new("RGB", (17_000, 1), RED), "PNG")
    with pytest.raises(SampleSkipped) as info:
        prepare_image(data, image_size=0, image_format="webp", max_aspect=17_000)  # past extreme_aspect
    assert info.value.reason == "unencodable"


# ---------------------------------------------------------------- extreme aspect ratios


def prepare_skip(data: bytes, **kwargs) -> SampleSkipped:
    with pytest.raises(SampleSkipped) as info:
        prepare_image(data, image_size=32, **kwargs)
    return info.value


@pytest.mark.parametrize(("width", "height"), [(1, 60_000), (60_000, 1)])
@pytest.mark.parametrize("image_size", [32, 0])  # 0 stores the source size, but CLIP still sees the crop
def test_extreme_aspect_is_skipped_not_blown_up_from_one_pixel(width, height, image_size):
    data = to_bytes(noise_rgb(width, height), "PNG")
    with pytest.raises(SampleSkipped) as info:
        prepare_image(data, image_size=image_size, image_format="png")
    assert info.value.reason == "extreme_aspect"
    assert info.value.detail == f"{width}x{height}: aspect 60000:1 > --max-aspect 10"
    rgb, _ = decode_rgb(data)  # plain decoding has no aspect limit: it is about the crop
    assert rgb.size == (width, height)


def test_aspect_at_the_limit_is_kept_and_the_limit_is_a_parameter():
    at_limit = to_bytes(noise_rgb(10, 100), "PNG")  # exactly 10:1
    prepared = prepare_image(at_limit, image_size=8, image_format="png")
    assert (prepared.width, prepared.height) == (10, 100) and prepared.pixels.shape == (8, 8, 3)
    over = prepare_skip(to_bytes(noise_rgb(100, 9), "PNG"))
    assert (over.reason, over.detail) == ("extreme_aspect", "100x9: aspect 11.1:1 > --max-aspect 10")
    assert prepare_skip(at_limit, max_aspect=9.5).detail == "10x100: aspect 10:1 > --max-aspect 9.5"
    strip = to_bytes(noise_rgb(1, 60_000), "PNG")
    assert prepare_image(strip, image_size=8, max_aspect=60_000).height == 60_000


def test_extreme_aspect_is_read_from_the_header_before_the_pixels():
    data = to_bytes(noise_rgb(60_000, 1), "PNG")
    cut = data[: len(data) // 2]
    assert prepare_skip(cut, max_aspect=60_000).reason == "truncated"  # decoding the pixels fails...
    assert prepare_skip(cut).reason == "extreme_aspect"  # ...and is never tried


# ---------------------------------------------------------------- conversions


def test_decode_ignores_the_file_name(tmp_path):
    path = tmp_path / "really_a_jpeg.png"
    path.write_bytes(to_bytes(Image.new("RGB", (16, 16), BLUE), "JPEG"))
    rgb, labels = decode_rgb(path.read_bytes())
    assert rgb.mode == "RGB" and labels == []
    assert close(rgb.getpixel((8, 8)), BLUE)
    prepared = prepare_image(path.read_bytes(), image_size=16, image_format="jpg")
    assert prepared.data == path.read_bytes()  # it is a JPEG, whatever it is called


def test_clean_rgb_has_no_labels_and_empty_info():
    data = to_bytes(Image.new("RGB", (8, 6), GREEN), "PNG", icc_profile=b"fake", dpi=(300, 300))
    rgb, labels = decode_rgb(data)
    assert labels == [] and rgb.mode == "RGB" and rgb.size == (8, 6)
    assert rgb.info == {}


def test_cmyk_jpeg_becomes_rgb():
    data = to_bytes(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)  # pure cyan
    rgb, labels = decode_rgb(data)
    assert labels == ["cmyk"] and rgb.mode == "RGB"
    assert close(rgb.getpixel((8, 8)), (0, 255, 255))


def test_ycbcr_becomes_rgb():
    data = to_bytes(Image.new("RGB", (8, 8), RED).convert("YCbCr"), "TIFF")
    rgb, labels = decode_rgb(data)
    assert labels == ["ycbcr"]
    assert close(rgb.getpixel((4, 4)), RED)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_greyscale_becomes_rgb(fmt):
    data = to_bytes(Image.new("L", (8, 8), 77), fmt)
    rgb, labels = decode_rgb(data)
    assert labels == ["greyscale"] and rgb.mode == "RGB"
    assert close(rgb.getpixel((4, 4)), (77, 77, 77), tol=1)


def test_one_bit_becomes_rgb():
    img = Image.new("1", (8, 8), 0)
    img.putpixel((1, 1), 1)
    rgb, labels = decode_rgb(to_bytes(img, "PNG"))
    assert labels == ["greyscale"]
    assert rgb.getpixel((1, 1)) == WHITE and rgb.getpixel((0, 0)) == (0, 0, 0)


def _palette_image() -> Image.Image:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0] + [200, 100, 50] + [10, 20, 30] * 254)
    img.putpixel((0, 0), 0)  # index 0 will be the transparent one
    return img


def test_palette_with_transparency_composites_on_white():
    rgb, labels = decode_rgb(to_bytes(_palette_image(), "PNG", transparency=0))
    assert labels == ["palette", "alpha"]
    assert rgb.getpixel((0, 0)) == WHITE  # transparent black -> white, not black
    assert rgb.getpixel((4, 4)) == (200, 100, 50)


def test_palette_without_transparency():
    rgb, labels = decode_rgb(to_bytes(_palette_image(), "PNG"))
    assert labels == ["palette"]
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((4, 4)) == (200, 100, 50)


def test_palette_with_alpha_mode_pa():
    img = _palette_image().convert("PA")
    img.putpixel((0, 0), (1, 0))
    rgb, labels = decode_rgb(to_bytes(img, "WEBP", lossless=True))  # WebP reopens it as RGBA
    assert "alpha" in labels
    assert rgb.getpixel((0, 0)) == WHITE


def test_rgba_alpha_composited_on_white():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., :3] = (10, 20, 30)
    arr[..., 3] = 255
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent black
    arr[1, 1] = (0, 0, 0, 128)  # half-transparent black
    rgb, labels = decode_rgb(to_bytes(Image.fromarray(arr), "PNG"))
    assert labels == ["alpha"]
    assert rgb.getpixel((0, 0)) == WHITE
    assert close(rgb.getpixel((1, 1)), (127, 127, 127), tol=1)
    assert rgb.getpixel((2, 2)) == (10, 20, 30)


def test_rgb_colour_key_transparency_composited_on_white():
    img = Image.new("RGB", (4, 4), (1, 2, 3))
    img.putpixel((3, 3), RED)
    rgb, labels = decode_rgb(to_bytes(img, "PNG", transparency=(1, 2, 3)))
    assert labels == ["alpha"]
    assert rgb.getpixel((0, 0)) == WHITE and rgb.getpixel((3, 3)) == RED


def test_greyscale_with_alpha():
    img = Image.new("LA", (4, 4), (50, 255))
    img.putpixel((0, 0), (50, 0))
    rgb, labels = decode_rgb(to_bytes(img, "PNG"))
    assert labels == ["greyscale", "alpha"]
    assert rgb.getpixel((0, 0)) == WHITE and rgb.getpixel((1, 1)) == (50, 50, 50)


def test_16bit_greyscale_png_is_scaled_not_clipped():
    values = np.array([[0, 65535, 32768, 257 * 100, 256]], np.uint16)
    data = png16(values, color_type=0)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")  # what PIL gives us to convert
    rgb, labels = decode_rgb(data)
    assert labels == ["16bit", "greyscale"]
    grey = np.asarray(rgb)[0, :, 0]
    # PIL's convert("L") would give 0, 255, 255, 255, 255 here (clipping).
    assert grey.tolist() == [0, 255, 128, 100, 1]
    assert (np.asarray(rgb)[..., 0] == np.asarray(rgb)[..., 2]).all()


def test_16bit_rgb_png_is_labelled_and_scaled():
    arr = np.zeros((2, 3, 3), np.uint16)
    arr[0, 0] = (65535, 0, 32768)
    arr[1, 2] = (257 * 200, 257 * 10, 65535)
    data = png16(arr, color_type=2)
    rgb, labels = decode_rgb(data)
    assert labels == ["16bit"]
    assert close(rgb.getpixel((0, 0)), (255, 0, 128), tol=1)
    assert close(rgb.getpixel((2, 1)), (200, 10, 255), tol=1)
    # Already RGB in PIL's eyes, but a 48-bit PNG must not be stored as is: it is re-encoded at 8 bits.
    prepared = prepare_image(data, image_size=0, image_format="png")
    assert prepared.data != data and prepared.converted == "16bit"
    assert prepared.data[24] == 8  # IHDR bit depth


def test_16bit_rgba_png_is_labelled_and_composited():
    arr = np.full((2, 2, 4), 65535, np.uint16)
    arr[0, 0] = (0, 0, 0, 0)
    rgb, labels = decode_rgb(png16(arr, color_type=6))
    assert labels == ["16bit", "alpha"]
    assert rgb.getpixel((0, 0)) == WHITE and rgb.getpixel((1, 1)) == WHITE


def test_32bit_int_and_float_greyscale_tiff():
    ints = Image.fromarray(np.array([[0, 65535, 32768]], np.int32))
    rgb, labels = decode_rgb(to_bytes(ints, "TIFF"))
    assert labels == ["16bit", "greyscale"]
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 255, 128]
    floats = Image.fromarray(np.array([[0.0, 0.5, 0.25]], np.float32))  # 0..1 floats: scaled, not stretched
    rgb, _ = decode_rgb(to_bytes(floats, "TIFF"))
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 64]
    wide = Image.fromarray(np.array([[-10.0, 90.0, 40.0]], np.float32))  # any other range: stretched
    rgb, _ = decode_rgb(to_bytes(wide, "TIFF"))
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 255, 128]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_uses_the_first_frame(fmt):
    frames = [Image.new("RGB", (8, 6), colour) for colour in (RED, GREEN, BLUE)]
    data = to_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50)
    rgb, labels = decode_rgb(data)
    assert labels[0] == "animated" and rgb.size == (8, 6)
    assert close(rgb.getpixel((4, 3)), RED)


@pytest.mark.parametrize(
    ("orientation", "corner"),
    [(6, (19, 0)), (8, (0, 39)), (3, (39, 19))],  # 90 CW, 90 CCW, 180; stored marker at top-left
)
def test_exif_orientation_is_applied(orientation, corner):
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 6, 6))
    data = with_orientation(img, orientation)
    rgb, labels = decode_rgb(data)
    assert labels == ["exif_rotated"]
    assert rgb.size == ((20, 40) if orientation in (6, 8) else (40, 20))
    x, y = corner
    inward = (x + (2 if x == 0 else -2), y + (2 if y == 0 else -2))
    assert close(rgb.getpixel(inward), RED, tol=20)
    assert close(rgb.getpixel((rgb.width // 2, rgb.height // 2)), BLUE, tol=20)
    prepared = prepare_image(data, image_size=0)
    assert (prepared.width, prepared.height) == rgb.size and prepared.converted == "exif_rotated"


def test_exif_orientation_1_is_not_a_conversion():
    data = with_orientation(Image.new("RGB", (16, 16), BLUE), 1)
    assert decode_rgb(data)[1] == []
    assert prepare_image(data, image_size=16).data == data


def test_exif_rotation_reported_size_is_the_original_even_when_resized():
    data = with_orientation(noise_rgb(80, 40), 6)
    prepared = prepare_image(data, image_size=16)
    assert (prepared.width, prepared.height) == (40, 80)
    assert prepared.pixels.shape == (16, 16, 3)


# ---------------------------------------------------------------- fit_square


def test_fit_square_wide_keeps_the_centre():
    img = Image.new("RGB", (90, 30), RED)
    img.paste(GREEN, (30, 0, 60, 30))  # the centre 30 x 30 square
    out = fit_square(img, 16)
    assert out.size == (16, 16)
    arr = np.asarray(out).astype(int)
    assert np.abs(arr - np.array(GREEN)).max() <= 2  # no red from the sides


def test_fit_square_tall_keeps_the_centre():
    img = Image.new("RGB", (20, 61), RED)
    img.paste(BLUE, (0, 20, 20, 40))
    out = fit_square(img, 8)
    assert out.size == (8, 8)
    assert np.abs(np.asarray(out).astype(int) - np.array(BLUE)).max() <= 2


def test_fit_square_upscales_and_returns_same_object_when_already_square():
    img = Image.new("RGB", (10, 10), RED)
    assert fit_square(img, 10) is img
    up = fit_square(img, 32)
    assert up.size == (32, 32) and up.getpixel((16, 16)) == RED
    with pytest.raises(ValueError):
        fit_square(img, 0)


def test_fit_square_antialiases():
    # A 1-pixel checkerboard shrunk 8x must average to grey, not alias to one of its colours.
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    out = np.asarray(fit_square(Image.fromarray(checker).convert("RGB"), 8)).astype(int)
    assert np.abs(out - 128).max() <= 3


# ---------------------------------------------------------------- encode


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_encode_is_deterministic_and_writes_the_right_format(ext):
    img = noise_rgb(32, 24, seed=3)
    first, second = encode_image(img, ext), encode_image(img.copy(), ext)
    assert first == second
    decoded = Image.open(io.BytesIO(first))
    assert decoded.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    assert decoded.size == (32, 24) and decoded.mode == "RGB"


def test_encode_quality_matters_for_lossy_formats():
    img = noise_rgb(32, 32, seed=4)
    assert encode_image(img, "jpg", quality=95) != encode_image(img, "jpg", quality=50)
    assert encode_image(img, "webp", quality=95) != encode_image(img, "webp", quality=50)


def test_jpg_keeps_full_colour_resolution():
    # Alternating 1-px red and blue columns: 4:2:0 chroma subsampling would average them to purple.
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, 0::2] = RED
    arr[:, 1::2] = BLUE
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(Image.fromarray(arr), "jpg")))).astype(int)
    assert np.abs(decoded - arr).max() < 60


def test_encode_writes_pixels_only():
    img = noise_rgb(16, 16, seed=5)
    tagged = img.copy()
    tagged.info.update({"icc_profile": b"not really", "comment": b"hello", "transparency": (0, 0, 0)})
    for ext in ("jpg", "png", "webp"):
        assert encode_image(tagged, ext) == encode_image(img, ext)
    assert "icc_profile" in tagged.info  # the caller's image is not modified


def test_encode_rejects_unknown_format():
    with pytest.raises(ValueError):
        encode_image(Image.new("RGB", (4, 4)), "gif")


# ---------------------------------------------------------------- prepare_image


@pytest.mark.parametrize(("ext", "fmt"), [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_clean_source_at_the_right_size_and_format_is_kept_byte_for_byte(ext, fmt):
    source = to_bytes(noise_rgb(32, 32, seed=6), fmt)
    prepared = prepare_image(source, image_size=32, image_format=ext)
    assert prepared.data == source
    assert prepared.ext == ext and prepared.converted is None
    assert (prepared.width, prepared.height) == (32, 32)
    np.testing.assert_array_equal(prepared.pixels, np.asarray(Image.open(io.BytesIO(source)).convert("RGB")))


def test_source_is_reencoded_when_the_size_differs():
    source = to_bytes(noise_rgb(48, 32, seed=7), "JPEG")
    prepared = prepare_image(source, image_size=32, image_format="jpg")
    assert prepared.data != source and prepared.converted is None
    assert Image.open(io.BytesIO(prepared.data)).size == (32, 32)
    assert (prepared.width, prepared.height) == (48, 32)


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", "jpg"), ("JPEG", "png"), ("JPEG", "webp"), ("BMP", "png")])
def test_source_is_reencoded_when_the_format_differs(fmt, ext):
    source = to_bytes(noise_rgb(32, 32, seed=8), fmt)
    prepared = prepare_image(source, image_size=32, image_format=ext)
    assert prepared.data != source
    assert Image.open(io.BytesIO(prepared.data)).format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]


def test_source_is_reencoded_when_a_conversion_happened():
    grey = to_bytes(Image.new("L", (32, 32), 90), "JPEG")
    prepared = prepare_image(grey, image_size=32, image_format="jpg")
    assert prepared.data != grey and prepared.converted == "greyscale"
    assert Image.open(io.BytesIO(prepared.data)).mode == "RGB"
    rgba = to_bytes(Image.new("RGBA", (32, 32), (1, 2, 3, 255)), "PNG")
    assert prepare_image(rgba, image_size=32, image_format="png").data != rgba


def test_several_conversions_are_comma_joined():
    img = Image.new("L", (16, 16), 40)
    prepared = prepare_image(with_orientation(img, 6), image_size=8)
    assert prepared.converted == "exif_rotated,greyscale"


def test_image_size_zero_keeps_the_original_size():
    rgba = Image.new("RGBA", (40, 24), (0, 0, 0, 0))
    prepared = prepare_image(to_bytes(rgba, "PNG"), image_size=0, image_format="jpg")
    assert prepared.pixels.shape == (24, 40, 3) and prepared.converted == "alpha"
    assert Image.open(io.BytesIO(prepared.data)).size == (40, 24)
    assert (prepared.pixels.astype(int) >= 250).all()  # transparent -> white
    clean = to_bytes(noise_rgb(40, 24), "JPEG")
    assert prepare_image(clean, image_size=0, image_format="jpg").data == clean


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_pixels_are_the_stored_image_decoded(ext):
    prepared = prepare_image(to_bytes(noise_rgb(50, 40, seed=9), "PNG"), image_size=24, image_format=ext)
    assert prepared.pixels.dtype == np.uint8 and prepared.pixels.shape == (24, 24, 3)
    assert prepared.pixels.flags.writeable and prepared.pixels.flags.c_contiguous
    stored = np.asarray(Image.open(io.BytesIO(prepared.data)).convert("RGB"))
    np.testing.assert_array_equal(prepared.pixels, stored)


def test_prepare_is_deterministic():
    source = to_bytes(noise_rgb(70, 50, seed=10), "JPEG")
    for ext in ("jpg", "png", "webp"):
        assert prepare_image(source, image_size=24, image_format=ext) == prepare_image(
            source, image_size=24, image_format=ext
        )


def test_large_jpeg_reduced_decode_matches_full_decode():
    # JPEG sources are decoded at a reduced DCT scale when they are much larger than the target.
    y, x = np.mgrid[0:600, 0:800]
    arr = np.stack([x * 255 // 800, y * 255 // 600, (x + y) % 256], -1).astype(np.uint8)
    arr[280:320, 380:420] = (255, 255, 255)  # a centre marker: the crop must stay centred
    source = to_bytes(Image.fromarray(arr), "JPEG", quality=95)
    prepared = prepare_image(source, image_size=50, image_format="png")
    full, _ = decode_rgb(source)
    reference = np.asarray(fit_square(full, 50)).astype(float)
    mse = ((prepared.pixels.astype(float) - reference) ** 2).mean()
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 35
    assert (prepared.width, prepared.height) == (800, 600)


def test_large_jpeg_is_decoded_at_reduced_scale(monkeypatch):
    from PIL import JpegImagePlugin

    requested = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        requested.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    prepare_image(to_bytes(noise_rgb(400, 300), "JPEG"), image_size=32)
    assert requested == [(64, 64)]  # DCT scaling down to >= 2 x the target, Lanczos does the rest
    requested.clear()
    decode_rgb(to_bytes(noise_rgb(400, 300), "JPEG"))
    assert requested == []  # decode_rgb alone gives the full image


def test_prepared_image_pickles_and_compares_by_bytes():
    prepared = prepare_image(to_bytes(noise_rgb(20, 20), "PNG"), image_size=16)
    clone = pickle.loads(pickle.dumps(prepared))
    assert clone == prepared and hash(clone) == hash(prepared)
    np.testing.assert_array_equal(clone.pixels, prepared.pixels)
    assert isinstance(clone, PreparedImage)


@pytest.mark.parametrize(
    "kwargs",
    [{"image_size": -1}, {"image_size": 16, "image_format": "gif"}, {"image_size": 16, "quality": 0}],
)
def test_prepare_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        prepare_image(to_bytes(noise_rgb(8, 8), "PNG"), **kwargs)


def test_prepare_propagates_skips():
    with pytest.raises(SampleSkipped) as info:
        prepare_image(b"", image_size=16)
    assert info.value.reason == "empty"


def test_supported_extensions_are_lower_case_and_decodable():
    """The extensions folder scanning picks up (the image-file reader's) all decode."""
    from inputs.image_file import IMAGE_EXTENSIONS as SUPPORTED_EXTENSIONS

    assert all(ext == ext.lower() and ext.startswith(".") for ext in SUPPORTED_EXTENSIONS)
    fmt_for = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}
    for ext in SUPPORTED_EXTENSIONS:
        rgb, _ = decode_rgb(to_bytes(Image.new("RGB", (4, 4), RED), fmt_for[ext]))
        assert close(rgb.getpixel((2, 2)), RED)
