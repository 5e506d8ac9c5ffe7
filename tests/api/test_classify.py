"""Every classify route and error code, in-process (TestClient runs the lifespan)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model.checkpoint import ModelCard
from tests.helpers.api import assert_error, make_client, wait_ready
from tests.helpers.versions import encode, make_version


def photo_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_classify_a_photo(client: TestClient, card: ModelCard, jpeg_photos: list[Path]) -> None:
    r = client.post(
        "/v1/classify", files={"file": ("cat.jpg", photo_bytes(jpeg_photos[0]), "image/jpeg")}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "alexnet", "version": card.version}
    preds = body["predictions"]
    assert len(preds) == 5
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert all(p["label"] == card.labels[p["index"]] for p in preds)
    assert re.fullmatch(r"[0-9a-f]{32}", body["prediction_id"])


def test_every_answer_has_its_own_unguessable_id(
    client: TestClient, jpeg_photos: list[Path]
) -> None:
    """128 random bits per answer, the same image twice included; in a batch, one per file
    answered and none for a file that got an error."""
    photo = photo_bytes(jpeg_photos[0])
    ids = [client.post("/v1/classify", files={"file": ("a.jpg", photo)}).json()["prediction_id"]
           for _ in range(20)]  # fmt: skip
    files = [("files", (f"{i}.jpg", photo)) for i in range(3)] + [("files", ("x.txt", b"no"))]
    results = client.post("/v1/classify/batch", files=files).json()["results"]
    ids += [r["prediction_id"] for r in results[:3]]
    assert "prediction_id" not in results[3] and results[3]["error"]
    assert len(set(ids)) == len(ids) == 23
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # no structure to guess from: about half of all 23 x 128 bits are set
    bits = sum(bin(int(i, 16)).count("1") for i in ids)
    assert 0.4 < bits / (23 * 128) < 0.6


def test_top_k(client: TestClient, jpeg_photos: list[Path]) -> None:
    files = {"file": ("a.jpg", photo_bytes(jpeg_photos[1]))}
    assert len(client.post("/v1/classify?top_k=1", files=files).json()["predictions"]) == 1
    assert len(client.post("/v1/classify?top_k=10", files=files).json()["predictions"]) == 10
    assert_error(client.post("/v1/classify?top_k=0", files=files), 422, "validation_error")
    err = assert_error(client.post("/v1/classify?top_k=11", files=files), 422, "validation_error")
    assert "at most 10" in str(err["message"])


def test_format_is_sniffed_not_taken_from_the_name(client: TestClient) -> None:
    png = encode(Image.new("RGB", (80, 80), (200, 10, 10)), "PNG")
    r = client.post("/v1/classify", files={"file": ("photo.gif", png, "image/gif")})
    assert r.status_code == 200
    tiff = encode(Image.new("RGB", (80, 80)), "TIFF")
    assert_error(client.post("/v1/classify", files={"file": ("x.jpg", tiff, "image/jpeg")}),
                 415, "unsupported_media_type")  # fmt: skip
    assert_error(client.post("/v1/classify", files={"file": ("x.png", b"hello", "image/png")}),
                 415, "unsupported_media_type")  # fmt: skip


def test_corrupt_and_truncated_images_are_400(client: TestClient, jpeg_photos: list[Path]) -> None:
    data = photo_bytes(jpeg_photos[0])
    assert_error(client.post("/v1/classify", files={"file": ("t.jpg", data[: len(data) // 3])}),
                 400, "invalid_image")  # fmt: skip
    assert_error(client.post("/v1/classify", files={"file": ("c.png", b"\x89PNG\r\n\x1a\nxx")}),
                 400, "invalid_image")  # fmt: skip


def test_too_many_pixels_is_image_too_large(client: TestClient) -> None:
    big = encode(Image.new("L", (2500, 2000)), "PNG")  # 5 MP > the 4 MP limit, small file
    assert_error(
        client.post("/v1/classify", files={"file": ("big.png", big)}), 413, "image_too_large"
    )


def test_a_file_over_the_upload_limit_is_payload_too_large(client: TestClient) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")  # ~4.3 MB > 2 MiB
    assert len(data) > 2 * 1024 * 1024
    assert_error(
        client.post("/v1/classify", files={"file": ("n.png", data)}), 413, "payload_too_large"
    )


def test_missing_field_and_wrong_content_type(client: TestClient) -> None:
    png = encode(Image.new("RGB", (80, 80)), "PNG")
    assert_error(
        client.post("/v1/classify", files={"image": ("a.png", png)}), 422, "validation_error"
    )
    assert_error(client.post("/v1/classify", json={"file": "x"}), 415, "unsupported_media_type")
    assert_error(
        client.post(
            "/v1/classify",
            content=b"--x\r\nbroken",
            headers={"content-type": "multipart/form-data"},
        ),
        400,
        "invalid_request",
    )  # no boundary
    assert_error(
        client.post(
            "/v1/classify",
            content=b"--x\r\nbroken",
            headers={"content-type": "multipart/form-data; boundary=x"},
        ),
        400,
        "invalid_request",
    )  # no end: malformed, not a form without its field


def test_batch_answers_file_by_file(client: TestClient, jpeg_photos: list[Path]) -> None:
    files = [
        ("files", ("good1.jpg", photo_bytes(jpeg_photos[0]))),
        ("files", ("bad.txt", b"not an image")),
        ("files", ("good2.jpg", photo_bytes(jpeg_photos[2]))),
        ("files", ("broken.jpg", b"\xff\xd8\xff\xe0broken")),
    ]
    r = client.post("/v1/classify/batch?top_k=2", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["good1.jpg", "bad.txt", "good2.jpg", "broken.jpg"]
    assert len(results[0]["predictions"]) == 2 and "error" not in results[0]
    assert (
        results[1]["error"]["code"] == "unsupported_media_type" and "predictions" not in results[1]
    )
    assert results[3]["error"]["code"] == "invalid_image"
    # the batch answer equals the single answer for the same file
    single = client.post(
        "/v1/classify?top_k=2", files={"file": ("g.jpg", photo_bytes(jpeg_photos[2]))}
    )
    # (indices exactly; probabilities to bf16's rounding, which depends on the batch shape)
    alone, batched = single.json()["predictions"], results[2]["predictions"]
    assert [p["index"] for p in alone] == [p["index"] for p in batched]
    assert [p["probability"] for p in alone] == pytest.approx(
        [p["probability"] for p in batched], abs=2e-3
    )


def test_batch_limits(client: TestClient) -> None:
    png = encode(Image.new("RGB", (80, 80)), "PNG")
    five = [("files", (f"{i}.png", png)) for i in range(5)]
    assert_error(client.post("/v1/classify/batch", files=five), 413, "too_many_files")
    assert_error(
        client.post("/v1/classify/batch", files={"file": ("a.png", png)}), 422, "validation_error"
    )


def test_filenames_are_echoed_never_used_as_paths(client: TestClient, tmp_path: Path) -> None:
    png = encode(Image.new("RGB", (80, 80)), "PNG")
    name = "../../../../tmp/evil.png"
    r = client.post("/v1/classify/batch", files=[("files", (name, png))])
    assert r.json()["results"][0]["filename"] == name
    assert not Path("/tmp/evil.png").exists()


def test_every_mode_of_upload_is_served(client: TestClient) -> None:
    for mode in ("L", "LA", "P", "RGBA", "CMYK", "1"):
        img = Image.new(mode, (90, 70))
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        r = client.post("/v1/classify", files={"file": ("x", encode(img, fmt))})
        assert r.status_code == 200, (mode, r.text)


def test_gif_first_frame_webp_bmp(client: TestClient) -> None:
    for fmt in ("GIF", "WEBP", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (90, 70), (0, 0, 200)).save(buf, format=fmt)
        r = client.post("/v1/classify", files={"file": ("x", buf.getvalue())})
        assert r.status_code == 200, (fmt, r.text)


def test_a_model_with_fewer_than_five_classes(tmp_path: Path, jpeg_photos: list[Path]) -> None:
    """The default top_k is 5, or every class when there are fewer; an explicit top_k past
    num_classes stays a 422; a non-image still gets its own format error."""
    home = tmp_path / "home"
    card = make_version(home / "models", num_classes=4, activate=True)
    photo = ("p.jpg", photo_bytes(jpeg_photos[0]))
    with make_client(home) as c:
        wait_ready(c)
        r = c.post("/v1/classify", files={"file": photo})
        assert r.status_code == 200, r.text
        assert sorted(p["label"] for p in r.json()["predictions"]) == sorted(card.labels)
        batch = c.post("/v1/classify/batch", files=[("files", photo), ("files", ("n.txt", b"hi"))])
        assert batch.status_code == 200, batch.text
        good, bad = batch.json()["results"]
        assert len(good["predictions"]) == 4
        assert bad["error"]["code"] == "unsupported_media_type"
        assert_error(c.post("/v1/classify", files={"file": ("n.txt", b"hi")}), 415,
                     "unsupported_media_type")  # fmt: skip
        assert len(c.post("/v1/classify?top_k=2", files={"file": photo}).json()["predictions"]) == 2
        err = assert_error(c.post("/v1/classify?top_k=5", files={"file": photo}), 422,
                           "validation_error")  # fmt: skip
        assert "at most 4" in str(err["message"])


def test_feedback_while_it_is_off_is_a_clear_error(
    client: TestClient, jpeg_photos: list[Path]
) -> None:
    """This module's server runs without ALEXNET_FEEDBACK: nothing of an upload is kept."""
    r = client.post("/v1/classify", files={"file": ("a.jpg", jpeg_photos[0].read_bytes())})
    pid = r.json()["prediction_id"]
    err = assert_error(client.post("/v1/feedback", json={"prediction_id": pid, "label": "class_1"}),
                       503, "feedback_disabled")  # fmt: skip
    assert "ALEXNET_FEEDBACK=true" in err["message"]
    assert client.get("/v1/feedback").json() == {"enabled": False, "token_required": False}
    home = client.app.state.alexnet.settings.home  # type: ignore[attr-defined]
    assert not (Path(home) / "feedback").exists()
