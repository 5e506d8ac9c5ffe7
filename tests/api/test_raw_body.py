"""POST /v1/classify with the image itself as the body: every accepted format, the same
answers, limits and errors as the multipart upload (in-process; the real server's framing
of such bodies is in tests/e2e/test_server.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.helpers.api import assert_error
from tests.helpers.versions import encode


def _image() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))


FORMATS = {
    "JPEG": {"quality": 90},
    "PNG": {},
    "WEBP": {"quality": 90},
    "GIF": {},
    "BMP": {},
}


def _raw(client: TestClient, data: bytes, ctype: str | None, query: str = "") -> object:
    headers = {"Content-Type": ctype} if ctype is not None else {}
    return client.post("/v1/classify" + query, content=data, headers=headers)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_as_the_body_answers_as_multipart(client: TestClient, fmt: str) -> None:
    data = encode(_image(), fmt, **FORMATS[fmt])
    multipart = client.post("/v1/classify", files={"file": ("x", data)})
    assert multipart.status_code == 200, multipart.text
    for ctype in (f"image/{fmt.lower()}", "application/octet-stream", "IMAGE/X-Anything; q=1"):
        r = _raw(client, data, ctype)
        assert r.status_code == 200, (ctype, r.text)  # type: ignore[attr-defined]
        body = r.json()  # type: ignore[attr-defined]
        assert body["predictions"] == multipart.json()["predictions"]
        assert body["model"] == multipart.json()["model"]
        assert body["prediction_id"] != multipart.json()["prediction_id"]


def test_the_bytes_decide_not_the_declared_type(client: TestClient) -> None:
    png = encode(_image(), "PNG")
    assert _raw(client, png, "image/jpeg").status_code == 200  # type: ignore[attr-defined]
    tiff = encode(_image(), "TIFF")
    assert_error(_raw(client, tiff, "image/tiff"), 415, "unsupported_media_type")
    assert_error(_raw(client, b"hello", "application/octet-stream"), 415,
                 "unsupported_media_type")  # fmt: skip
    assert_error(_raw(client, b"", "image/png"), 415, "unsupported_media_type")


def test_bad_images_are_refused_as_in_multipart(
    client: TestClient, jpeg_photos: list[Path]
) -> None:
    data = jpeg_photos[0].read_bytes()
    assert_error(_raw(client, data[: len(data) // 3], "image/jpeg"), 400, "invalid_image")
    assert_error(_raw(client, b"\x89PNG\r\n\x1a\nxx", "image/png"), 400, "invalid_image")
    big = encode(Image.new("L", (2500, 2000)), "PNG")  # 5 MP > the 4 MP limit, small file
    assert_error(_raw(client, big, "image/png"), 413, "image_too_large")


def test_the_upload_limit_applies_to_the_body(client: TestClient) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")  # ~4.3 MB > the 2 MiB limit
    assert_error(_raw(client, data, "image/png"), 413, "payload_too_large")
    # just over the file limit but within the path's body limit: read, then 413 as well
    limit = 2 * 1024 * 1024
    just_over = encode(Image.new("RGB", (8, 8)), "PNG") + b"\0" * limit
    err = assert_error(_raw(client, just_over, "image/png"), 413, "payload_too_large")
    assert str(limit) in str(err["message"])


def test_other_media_types_are_415_with_both_ways_named(client: TestClient) -> None:
    png = encode(_image(), "PNG")
    for ctype in (None, "application/json", "text/plain", "application/x-www-form-urlencoded"):
        err = assert_error(_raw(client, png, ctype), 415, "unsupported_media_type")
        assert "multipart/form-data" in str(err["message"])
        assert "image/jpeg" in str(err["message"])


def test_query_options_apply(client: TestClient, jpeg_photos: list[Path]) -> None:
    data = jpeg_photos[1].read_bytes()
    r = _raw(client, data, "image/jpeg", "?top_k=2&min_confidence=1")
    body = r.json()  # type: ignore[attr-defined]
    assert len(body["predictions"]) == 2 and body["uncertain"] is True
    assert_error(_raw(client, data, "image/jpeg", "?top_k=11"), 422, "validation_error")


def test_the_schema_documents_the_raw_body(client: TestClient) -> None:
    content = client.get("/openapi.json").json()["paths"]["/v1/classify"]["post"]["requestBody"]
    assert set(content["content"]) == {"multipart/form-data", "image/*",
                                       "application/octet-stream"}  # fmt: skip
    batch = client.get("/openapi.json").json()["paths"]["/v1/classify/batch"]["post"]
    assert set(batch["requestBody"]["content"]) == {"multipart/form-data"}
