"""decode_tensor: baseline JPEGs through torchvision.io, bit for bit what Pillow gives;
every other case through Pillow, errors included."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import model.images as images
from model.images import DecodeLimits, ImageError, decode_image, decode_tensor, to_tensor
from tests.helpers.versions import encode


def _noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(w * h)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture
def fast_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the images torchvision decoded (those it refused are not counted)."""
    calls: list[int] = []
    real = images.decode_jpeg

    def spy(*args: object, **kw: object) -> torch.Tensor:
        out = real(*args, **kw)  # type: ignore[arg-type]
        calls.append(1)
        return out

    monkeypatch.setattr(images, "decode_jpeg", spy)
    return calls


def _pillow(data: bytes, min_side: int | None = None) -> torch.Tensor:
    return to_tensor(decode_image(data, min_side=min_side))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("rgb 4:2:0", encode(_noise(451, 300), "JPEG", quality=90)),
        ("rgb 4:4:4", encode(_noise(97, 61), "JPEG", quality=95, subsampling=0)),
        ("rgb q30", encode(_noise(320, 240), "JPEG", quality=30)),
        ("grey", encode(_noise(200, 150, "L"), "JPEG")),
        ("odd sizes", encode(_noise(33, 17), "JPEG")),
    ],
)
def test_baseline_jpegs_take_the_fast_path_with_the_same_pixels(
    fast_calls: list[int], name: str, data: bytes
) -> None:
    out = decode_tensor(data, min_side=256)
    assert fast_calls == [1], name
    assert out.dtype == torch.uint8 and out.shape[0] == 3
    assert torch.equal(out, _pillow(data, 256)), name


def test_real_photos_are_the_same_pixels(fast_calls: list[int], jpeg_photos: list[Path]) -> None:
    for path in jpeg_photos:
        img = Image.open(path).convert("RGB")
        small = encode(img.resize((451, 300)), "JPEG", quality=90)
        assert torch.equal(decode_tensor(small, min_side=256), _pillow(small, 256)), path
    assert len(fast_calls) == len(jpeg_photos)


def _rotated() -> bytes:
    img = _noise(120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to view
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "min_side"),
    [
        ("progressive", encode(_noise(200, 150), "JPEG", progressive=True), 256),
        ("exif rotated", _rotated(), 256),
        ("cmyk", encode(_noise(64, 48, "CMYK"), "JPEG"), 256),
        ("large: draft wins", encode(_noise(1200, 800), "JPEG"), 256),
        ("png", encode(_noise(64, 48), "PNG"), 256),
    ],
)
def test_everything_else_goes_through_pillow(
    fast_calls: list[int], name: str, data: bytes, min_side: int
) -> None:
    out = decode_tensor(data, min_side=min_side)
    assert fast_calls == [], name
    assert torch.equal(out, _pillow(data, min_side)), name
    if name == "exif rotated":
        assert tuple(out.shape) == (3, 120, 80)


def test_without_min_side_a_large_jpeg_is_decoded_at_full_scale(fast_calls: list[int]) -> None:
    data = encode(_noise(1200, 800), "JPEG")
    assert torch.equal(decode_tensor(data), _pillow(data)) and fast_calls == [1]


def test_limits_and_broken_files_give_pillows_errors() -> None:
    data = encode(_noise(451, 300), "JPEG")
    with pytest.raises(images.ImageTooLarge):
        decode_tensor(data, limits=DecodeLimits(max_pixels=100_000))
    with pytest.raises(images.ImageTooLarge):
        decode_tensor(data, limits=DecodeLimits(max_side=400))
    for broken in (data[: len(data) // 2], data[:600], b"\xff\xd8\xff" + b"\0" * 100):
        with pytest.raises(images.InvalidImage):
            decode_tensor(broken)


_SEED = encode(_noise(40, 24), "JPEG", quality=80)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       cut=st.integers(0, 10_000))  # fmt: skip
def test_fuzz_mutated_jpegs_decode_as_pillow_does(edits: list[tuple[int, int]], cut: int) -> None:
    """On damaged bytes the fast path never answers where Pillow refuses, nor differently."""
    data = bytearray(_SEED)
    for pos, val in edits:
        data[pos % len(data)] = val
    blob = bytes(data[: max(1, cut % (len(data) + 1))])
    try:
        expected = _pillow(blob)
    except ImageError:
        with pytest.raises(ImageError):
            decode_tensor(blob)
        return
    assert torch.equal(decode_tensor(blob), expected)
