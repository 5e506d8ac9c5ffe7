"""Turn untrusted image bytes into RGB pixels: sniff the format, bound the size, decode.

Every failure becomes one of three `ImageError`s (invalid, unsupported, too large); no
decoder exception escapes. Filenames are never consulted: the bytes decide.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

# Magic numbers of the accepted formats -> the Pillow plugin that may open them.
SUPPORTED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_MAGIC: Final = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
_BACKGROUND: Final = (255, 255, 255)  # transparent pixels are composited onto white
_ORIENTATION: Final = 0x0112  # the EXIF tag


class ImageError(ValueError):
    """Base of the decode errors. `code` names the failure for machines (the error code
    `alexnet predict --json` and the API show); app/errors.py picks the HTTP status."""

    code = "invalid_image"


class InvalidImage(ImageError):
    code = "invalid_image"


class UnsupportedImageFormat(ImageError):
    code = "unsupported_media_type"


class ImageTooLarge(ImageError):
    code = "image_too_large"


@dataclass(frozen=True)
class DecodeLimits:
    """Refuse images above these before any pixel is decoded (decompression bombs)."""

    max_pixels: int = 40_000_000
    max_side: int = 20_000


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading bytes, or None if not one we accept."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def decode_image(
    data: bytes, *, limits: DecodeLimits = DecodeLimits(), min_side: int | None = None
) -> Image.Image:
    """Decode `data` to an RGB image: EXIF orientation applied, first frame of an
    animation, transparency composited onto white, 16-bit greyscale scaled (not clipped).

    `min_side`: the smallest side the caller needs; a JPEG much larger than that is
    decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft), which is several times faster.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImageFormat(
            f"not an accepted image format (accepted: {', '.join(SUPPORTED_FORMATS)})"
        )
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = img.size
        if width < 1 or height < 1:
            raise InvalidImage(f"image has no pixels ({width}x{height})")
        if width * height > limits.max_pixels or max(width, height) > limits.max_side:
            raise ImageTooLarge(
                f"image is {width}x{height}; the limit is {limits.max_pixels} pixels "
                f"and {limits.max_side} pixels a side"
            )
        if min_side is not None and fmt == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise InvalidImage(f"not a readable {fmt} image: its header is damaged") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning arrives here as an exception where the entry points have made
        # Pillow's bomb warnings errors (`warnings.filterwarnings("error", ...)`).
        raise ImageTooLarge(f"image is too large to decode safely: {exc}") from exc
    except Exception as exc:  # any decoder failure on hostile bytes is the client's error
        raise InvalidImage(f"could not decode {fmt} image: {exc}") from exc


def decode_tensor(
    data: bytes, *, limits: DecodeLimits = DecodeLimits(), min_side: int | None = None
) -> torch.Tensor:
    """`decode_image` as a uint8 tensor (3, H, W), the pixels the model sees.

    A baseline RGB or greyscale JPEG, upright, that Pillow would decode at full scale (not
    2x `min_side` on its short side, where `draft` decodes at 1/2..1/8 and wins) is decoded
    by torchvision.io.decode_jpeg: the same libjpeg-turbo pixels, bit for bit (tested),
    without the copy out of a Pillow image (0.6 vs 1.0 ms for a 451x300 photo with the
    conversion, docs/benchmarks.md). Everything else, and anything it refuses (truncated or
    corrupt data), goes through Pillow, which gives the errors."""
    if data[:3] == b"\xff\xd8\xff":
        fast = _fast_jpeg(data, limits, min_side)
        if fast is not None:
            return fast
    return to_tensor(decode_image(data, limits=limits, min_side=min_side))


def _fast_jpeg(data: bytes, limits: DecodeLimits, min_side: int | None) -> torch.Tensor | None:
    try:
        img = Image.open(io.BytesIO(data), formats=["JPEG"])  # the header only
        w, h = img.size
        if (
            img.mode not in ("RGB", "L")
            or "progressive" in img.info
            or "progression" in img.info
            or not (0 < w * h <= limits.max_pixels and max(w, h) <= limits.max_side)
            or (min_side is not None and min(w, h) >= 2 * min_side)
            or img.getexif().get(_ORIENTATION, 1) != 1
        ):
            return None
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out: torch.Tensor = decode_jpeg(buf, mode=ImageReadMode.RGB)
    except Exception:  # Pillow decides, and names the error
        return None
    if tuple(out.shape) != (3, h, w):
        return None
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way a viewer would show it on white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_high_depth_to_u8(img)).convert("RGB")  # 2-D uint8 -> "L"
    if (mode in ("P", "L", "RGB") and "transparency" in img.info) or mode in (
        "LA",
        "La",
        "PA",
        "RGBa",
    ):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        out = Image.new("RGB", img.size, _BACKGROUND)
        out.paste(img, mask=img.getchannel("A"))
        return out
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV


def _high_depth_to_u8(img: Image.Image) -> np.ndarray:
    """16-bit (and 32-bit integer) greyscale scaled to 0..255; float clipped to 0..255."""
    arr: np.ndarray = np.asarray(img)
    if img.mode == "F":
        clipped: np.ndarray = np.clip(arr, 0, 255).astype(np.uint8)
        return clipped
    wide = np.clip(arr.astype(np.int64), 0, 65535)
    out: np.ndarray = ((wide + 128) // 257).astype(np.uint8)
    return out


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> uint8 tensor (3, H, W)."""
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_image_file(
    path: Path, *, limits: DecodeLimits = DecodeLimits(), min_side: int | None = None
) -> torch.Tensor:
    """Decode an image file to a uint8 tensor (3, H, W); raises `ImageError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidImage(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_tensor(data, limits=limits, min_side=min_side)


# Pillow must never "repair" a truncated file into a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
