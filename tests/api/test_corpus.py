"""The decoder regression corpus (tests/corpus/images): every nasty file gets exactly the
answer recorded for it, through the service's intake path and through the decoder; and
mutated files through the intake path (hypothesis) never get a 5xx."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model.images import ImageError, decode_image, to_tensor
from model.transforms import EvalTransform, Preprocessing
from tests.helpers.versions import encode

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "images"
MANIFEST: dict[str, dict[str, object]] = json.loads((CORPUS / "manifest.json").read_text())


def test_every_corpus_file_has_an_expected_answer() -> None:
    files = {p.name for p in CORPUS.iterdir() if p.suffix not in (".json", ".md")}
    assert files == set(MANIFEST), files ^ set(MANIFEST)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus_file_through_the_service(client: TestClient, name: str) -> None:
    expected = MANIFEST[name]
    r = client.post("/v1/classify", files={"file": (name, (CORPUS / name).read_bytes())})
    assert r.status_code == expected["status"], (name, r.text)
    if r.status_code == 200:
        assert len(r.json()["predictions"]) == 5
    else:
        error = r.json()["error"]
        assert error["code"] == expected["code"], (name, error)
        assert "0x" not in error["message"], error["message"]  # no object reprs leak


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus_file_through_the_decoder_in_bounded_memory(name: str) -> None:
    """Peak RSS of this process may grow by at most 256 MiB per file (the thin PNGs took
    4 GB before their fix)."""
    tf = EvalTransform(Preprocessing.for_size(224))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        out = tf(to_tensor(decode_image((CORPUS / name).read_bytes(), min_side=256)))
    except ImageError as exc:
        assert MANIFEST[name]["status"] != 200 and exc.code == MANIFEST[name]["code"], exc
    else:
        assert MANIFEST[name]["status"] == 200 and out.shape == (3, 224, 224)
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew_kib < 256 * 1024, f"{name}: peak RSS +{grew_kib // 1024} MiB"


_SEEDS = [encode(Image.effect_noise((40, 30), 50).convert(mode), fmt)
          for mode, fmt in (("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("RGB", "WEBP"))]  # fmt: skip


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(
    seed=st.sampled_from(_SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(1, 10_000),
)
def test_fuzz_mutated_uploads_through_the_service(
    client: TestClient, seed: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    """Mutated JPEG/PNG/GIF/WebP uploads through the whole intake path (multipart,
    sniffing, limits, decoding, preprocessing, batching): a result or a 4xx in the
    envelope, never a 5xx."""
    data = bytearray(seed)
    for pos, val in edits:
        data[pos % len(data)] = val
    data = data[: max(1, cut % (len(data) + 1))]
    r = client.post("/v1/classify", files={"file": ("x.bin", bytes(data))})
    if r.status_code == 200:
        assert len(r.json()["predictions"]) == 5
    else:
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert r.json()["error"]["code"] in {
            "invalid_image", "unsupported_media_type", "image_too_large"}, r.text  # fmt: skip
