"""Decoding: every Pillow mode to the right RGB, orientation, animation, draft, limits,
and no exception other than ImageError on any input."""

from __future__ import annotations

import contextlib
import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model.images import (
    DecodeLimits,
    ImageError,
    ImageTooLarge,
    InvalidImage,
    UnsupportedImageFormat,
    decode_image,
    sniff_format,
)
from tests.helpers.versions import encode


def px(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return tuple(img.getpixel(xy))  # type: ignore[arg-type]


def test_greyscale_l() -> None:
    assert px(decode_image(encode(Image.new("L", (8, 8), 100), "PNG"))) == (100, 100, 100)


def test_bilevel_1() -> None:
    assert px(decode_image(encode(Image.new("1", (8, 8), 1), "PNG"))) == (255, 255, 255)


def test_la_transparency_composites_on_white() -> None:
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (100, 255))  # opaque grey
    img.putpixel((1, 0), (100, 0))  # fully transparent
    out = decode_image(encode(img, "PNG"))
    assert px(out, (0, 0)) == (100, 100, 100)
    assert px(out, (1, 0)) == (255, 255, 255)


def test_rgba_half_transparent_blends_with_white() -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 200, 128))
    r, g, b = px(decode_image(encode(img, "PNG")))
    assert (r, g) == (127, 127) or (abs(r - 127) <= 1 and abs(g - 127) <= 1)
    assert abs(b - 228) <= 1  # 200*a + 255*(1-a), a = 128/255


def test_palette_with_transparency_png_and_gif() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 0)  # red
    img.putpixel((1, 0), 1)  # green, declared transparent
    for fmt in ("PNG", "GIF"):
        out = decode_image(encode(img, fmt, transparency=1))
        assert px(out, (0, 0)) == (255, 0, 0), fmt
        assert px(out, (1, 0)) == (255, 255, 255), fmt


def test_palette_without_transparency() -> None:
    img = Image.new("P", (2, 2))
    img.putpalette([10, 20, 30] * 256)
    assert px(decode_image(encode(img, "PNG"))) == (10, 20, 30)


def test_cmyk_jpeg() -> None:
    img = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    r, g, b = px(decode_image(encode(img, "JPEG", quality=100)), (8, 8))
    assert r < 10 and g > 245 and b > 245


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = decode_image(encode(img, "PNG"))
    assert [px(out, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied() -> None:
    # 40x20: left half red, right half blue. EXIF 6 = "rotate 90 CW to display".
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (20, 40)
    top, bottom = px(out, (10, 5)), px(out, (10, 35))
    assert top[0] > 200 and top[2] < 60  # red on top after a clockwise turn
    assert bottom[2] > 200 and bottom[0] < 60


def test_first_frame_of_an_animated_gif_and_webp() -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    for fmt in ("GIF", "WEBP"):
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50,
                       **({"lossless": True} if fmt == "WEBP" else {}))  # fmt: skip
        r, _g, b = px(decode_image(buf.getvalue()), (4, 4))
        assert r > 240 and b < 15, fmt


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_every_accepted_format_decodes(fmt: str) -> None:
    out = decode_image(encode(Image.new("RGB", (20, 10), (0, 128, 0)), fmt))
    assert out.size == (20, 10)
    r, g, b = px(out, (5, 5))
    assert r < 10 and abs(g - 128) < 6 and b < 10


def test_format_comes_from_the_bytes_not_the_name() -> None:
    assert sniff_format(encode(Image.new("RGB", (4, 4)), "PNG")) == "PNG"
    assert sniff_format(b"<svg xmlns='http://www.w3.org/2000/svg'/>") is None
    with pytest.raises(UnsupportedImageFormat):
        decode_image(encode(Image.new("RGB", (4, 4)), "TIFF"))
    with pytest.raises(UnsupportedImageFormat):
        decode_image(b"%PDF-1.4 not an image")


def test_jpeg_is_decoded_at_reduced_scale_when_target_is_small() -> None:
    big = Image.new("RGB", (2000, 1500), (10, 200, 30))
    data = encode(big, "JPEG")
    assert decode_image(data).size == (2000, 1500)
    small = decode_image(data, min_side=256)
    assert small.size == (500, 375)  # 1/4 scale: the smallest with both sides >= 256


def test_pixel_and_side_limits_refuse_before_decoding() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageTooLarge, match="100x100"):
        decode_image(data, limits=DecodeLimits(max_pixels=9_999))
    with pytest.raises(ImageTooLarge):
        decode_image(data, limits=DecodeLimits(max_side=99))


def _png_with_header_size(width: int, height: int) -> bytes:
    """A valid PNG whose IHDR claims `width` x `height` (a decompression bomb header)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then length + "IHDR"
    struct.pack_into(">II", data, ihdr, width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    struct.pack_into(">I", data, ihdr + 13, crc)
    return bytes(data)


def test_decompression_bomb_header_is_refused() -> None:
    with pytest.raises(ImageTooLarge):
        decode_image(_png_with_header_size(50_000, 50_000))


def test_truncated_and_corrupt_files_are_invalid() -> None:
    good = encode(Image.effect_noise((64, 64), 40).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImage):
        decode_image(good[: len(good) // 2])
    with pytest.raises(InvalidImage):
        decode_image(b"\xff\xd8\xff" + b"\x00" * 100)
    with pytest.raises(InvalidImage):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"garbage")


_KINDS = [("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("RGB", "WEBP"), ("L", "BMP")]
_SEEDS = [encode(Image.effect_noise((24, 16), 50).convert(m), f) for m, f in _KINDS]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(_SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 10_000),
)
def test_fuzz_mutated_files_give_an_image_or_an_image_error(
    seed: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed)
    for pos, val in edits:
        data[pos % len(data)] = val
    data = data[: max(1, cut % (len(data) + 1))]
    try:
        out = decode_image(bytes(data))
    except ImageError:
        return
    assert out.mode == "RGB" and out.size[0] > 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    for prefix in (
        b"",
        b"\xff\xd8\xff",
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"BM",
        b"RIFF\0\0\0\0WEBP",
    ):
        with contextlib.suppress(ImageError):
            decode_image(prefix + data)
