"""Writes the hand-crafted members of the decoder regression corpus (tests/corpus/images).

The corpus is committed: these bytes are the regression tests, and files found by fuzzing
cannot be regenerated from a recipe. This script records how the crafted ones were made
and can add new ones: `python -m tests.corpus.make_corpus`. Expected outcomes live in
tests/corpus/images/manifest.json.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image

OUT = Path(__file__).parent / "images"


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, rows: bytes, *, extra: bytes = b"", depth: int = 8,
         colour: int = 2) -> bytes:  # fmt: skip
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra
            + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b""))  # fmt: skip


def thin_png() -> bytes:
    """20000x1: tiny, within the pixel limits, and once 5,120,000 x 256 pixels after the
    resize (the crop now comes first)."""
    return _png(20_000, 1, b"\x00" + b"\x80\x40\x20" * 20_000)


def tall_png() -> bytes:
    return _png(1, 20_000, (b"\x00" + b"\x20\x40\x80") * 20_000)


def header_bomb_png() -> bytes:
    """Declares 50000x50000 (2.5 G pixels) in 60 bytes of IDAT."""
    return _png(50_000, 50_000, b"\x00" * 64)


def zero_width_png() -> bytes:
    return _png(0, 10, b"")


def bad_crc_png() -> bytes:
    data = bytearray(_png(4, 4, (b"\x00" + b"\x10" * 12) * 4))
    data[29] ^= 0xFF  # the IHDR CRC
    return bytes(data)


def text_bomb_png() -> bytes:
    """A zTXt chunk that inflates to 4 MB: Pillow stops text chunks at 1 MB."""
    payload = b"k\x00\x00" + zlib.compress(b"\x00" * (4 * 1024 * 1024), 9)
    return _png(4, 4, (b"\x00" + b"\x10" * 12) * 4, extra=_chunk(b"zTXt", payload))


def many_frames_gif() -> bytes:
    """1,000 frames: only the first is ever decoded."""
    frames = []
    for i in range(1000):
        frame = Image.new("L", (4, 4), 0)
        frame.putpixel((i % 4, (i // 4) % 4), 255)
        frames.append(frame.convert("P"))
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)


def huge_screen_gif() -> bytes:
    """A 1x1 frame on a 65535x65535 logical screen."""
    data = bytearray(_save(Image.new("P", (1, 1)), "GIF"))
    struct.pack_into("<HH", data, 6, 65535, 65535)
    return bytes(data)


def huge_sof_jpeg() -> bytes:
    """A real 16x16 JPEG whose frame header claims 65500x65500."""
    data = bytearray(_save(Image.new("RGB", (16, 16), (200, 10, 10)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 65500, 65500)
    return bytes(data)


def truncated_progressive_jpeg() -> bytes:
    data = _save(Image.effect_noise((256, 256), 60).convert("RGB"), "JPEG", progressive=True)
    return data[: len(data) // 3]


def bad_exif_jpeg() -> bytes:
    """An EXIF block whose orientation is 99 and whose IFD offset points past its end."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 2)
    tiff += struct.pack(">HHII", 0x0112, 3, 1, 99 << 16)  # Orientation = 99
    tiff += struct.pack(">HHII", 0x8769, 4, 1, 0x7FFF_FFF0)  # ExifIFD far past the end
    tiff += b"\x00\x00\x00\x00"
    return _save(Image.new("RGB", (32, 24), (10, 200, 10)), "JPEG", exif=b"Exif\x00\x00" + tiff)


def huge_canvas_webp() -> bytes:
    """An animated WebP whose VP8X canvas claims 16384x16384 around one 1x1 frame."""
    data = bytearray(_save(Image.new("RGB", (1, 1)), "WEBP", save_all=True,
                           append_images=[Image.new("RGB", (1, 1), (255, 0, 0))]))  # fmt: skip
    vp8x = data.index(b"VP8X")
    data[vp8x + 12 : vp8x + 18] = (16383).to_bytes(3, "little") * 2  # canvas - 1
    return bytes(data)


def bmp_rle_overrun() -> bytes:
    """An RLE8 BMP whose run lengths overrun the declared 4x4 pixels."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    pixels = b"\xff\x07" * 64 + b"\x00\x01"  # runs of 255 pixels, then end of bitmap
    header_size, offset = 40, 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", header_size, 4, 4, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    head = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return head + info + palette + pixels


def polyglot() -> bytes:
    """GIF magic on a PNG body: the bytes decide the format, and these bytes are not a GIF."""
    return b"GIF89a" + _save(Image.new("RGB", (8, 8)), "PNG")[6:]


CRAFTED: dict[str, Callable[[], bytes]] = {
    "thin-20000x1.png": thin_png,
    "tall-1x20000.png": tall_png,
    "header-bomb-50000x50000.png": header_bomb_png,
    "zero-width.png": zero_width_png,
    "bad-ihdr-crc.png": bad_crc_png,
    "ztxt-bomb.png": text_bomb_png,
    "1000-frames.gif": many_frames_gif,
    "huge-logical-screen.gif": huge_screen_gif,
    "huge-sof.jpg": huge_sof_jpeg,
    "truncated-progressive.jpg": truncated_progressive_jpeg,
    "bad-exif.jpg": bad_exif_jpeg,
    "huge-canvas.webp": huge_canvas_webp,
    "rle8-overrun.bmp": bmp_rle_overrun,
    "gif-magic-png-body.gif": polyglot,
}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, make in CRAFTED.items():
        data = make()
        (OUT / name).write_bytes(data)
        print(f"{name:32} {len(data):8} bytes")


if __name__ == "__main__":
    main()
