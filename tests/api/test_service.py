"""Models, health, metrics, docs, the envelope for FastAPI's own errors, not-ready."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.state import AppState
from model.checkpoint import ModelCard
from tests.helpers.api import assert_error, make_client, wait_ready
from tests.helpers.versions import make_version


def test_models_list_and_active(client: TestClient, card: ModelCard) -> None:
    body = client.get("/v1/models").json()
    assert body["active"] == body["serving"] == card.version
    [v] = body["versions"]
    assert v["version"] == card.version and v["active"] and v["metrics"]["val_top1"] == 0.5
    active = client.get("/v1/models/active").json()
    assert active["version"] == card.version and active["labels"] == card.labels
    assert active["image_size"] == 64 and active["mean"] == list(card.mean)
    assert active["device"] == "cpu" and active["precision"] in ("fp32", "bf16")
    assert active["compiled"] is False and "sha256" in active


def test_health_and_readiness(client: TestClient, card: ModelCard) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["version"] == card.version


def test_metrics_cover_every_stage(client: TestClient, jpeg_photos: list[Path]) -> None:
    client.post("/v1/classify", files={"file": ("a.jpg", jpeg_photos[0].read_bytes())})
    client.post("/v1/classify", files={"file": ("a.txt", b"nope")})
    text = client.get("/metrics").text
    for needle in (
        'alexnet_requests_total{method="POST",route="/v1/classify",status="200"}',
        'alexnet_requests_total{method="POST",route="/v1/classify",status="415"}',
        'alexnet_stage_seconds_bucket{le="0.005",stage="decode"}',
        'alexnet_stage_seconds_count{stage="queue"}',
        'alexnet_stage_seconds_count{stage="inference"}',
        "alexnet_batch_size_bucket",
        "alexnet_queue_depth",
        'alexnet_rejections_total{reason="415"}',
        "alexnet_predictions_total{label=",
        'alexnet_model_info{compiled="false",device="cpu"',
        'alexnet_request_seconds_bucket{le="0.5",route="/v1/classify"}',
    ):
        assert needle in text, needle


def test_fastapis_own_errors_use_the_envelope(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.delete("/v1/models"), 405, "method_not_allowed")
    assert_error(
        client.post("/v1/classify?top_k=abc", files={"file": ("a", b"x")}), 422, "validation_error"
    )


def test_upload_page_is_served_offline(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/v1/classify" in r.text and "http://" not in r.text and "https://" not in r.text


def test_openapi_documents_errors_and_examples(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    classify = spec["paths"]["/v1/classify"]["post"]
    for status in ("400", "413", "415", "422", "429", "503", "504"):
        resp = classify["responses"][status]
        assert resp["content"]["application/json"]["example"]["error"]["code"]
    assert "multipart/form-data" in classify["requestBody"]["content"]
    assert "Retry-After" in classify["responses"]["429"]["headers"]
    for path, ops in spec["paths"].items():
        for op in ops.values():
            ok = op["responses"].get("200", {})
            has_example = "example" in str(ok) or "examples" in str(spec["components"])
            assert has_example, path


def test_docs_pages_load_their_assets_from_this_server(client: TestClient) -> None:
    # Swagger UI and ReDoc from the installed fastapi-offline package, not a CDN (the
    # browser test in tests/e2e runs them with the network cut off).
    for page, assets in {
        "/docs": ["/static/docs/swagger-ui-bundle.js", "/static/docs/swagger-ui.css"],
        "/redoc": ["/static/docs/redoc.standalone.js"],
    }.items():
        r = client.get(page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        assert "https://" not in r.text and "http://" not in r.text, page
        assert "default-src 'self'" in r.headers["content-security-policy"]
        for asset in assets:
            assert asset in r.text
            got = client.get(asset)
            assert got.status_code == 200 and len(got.content) > 100_000, asset
    assert client.get("/docs/oauth2-redirect").status_code == 200
    assert_error(client.get("/static/docs/nope.js"), 404, "not_found")
    assert not any(p.startswith(("/docs", "/redoc", "/static", "/favicon"))
                   for p in client.get("/openapi.json").json()["paths"])  # fmt: skip


def test_favicon_is_an_icon(client: TestClient) -> None:
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon"
    with Image.open(io.BytesIO(r.content)) as icon:
        assert icon.format == "ICO" and icon.size == (32, 32)


def test_no_model_means_503_with_retry_after(tmp_path: Path) -> None:
    with make_client(tmp_path / "home") as client:
        r = client.get("/readyz")
        assert_error(r, 503, "model_not_ready")
        assert int(r.headers["Retry-After"]) >= 1
        assert_error(
            client.post("/v1/classify", files={"file": ("a", b"x")}), 503, "model_not_ready"
        )
        assert client.get("/healthz").status_code == 200
        assert_error(client.get("/v1/models/active"), 503, "model_not_ready")


def test_a_corrupt_active_version_falls_back_to_the_previous_good_one(tmp_path: Path) -> None:
    home = tmp_path / "home"
    good = make_version(home / "models")
    bad = make_version(home / "models", seed=1, activate=True)
    (home / "models" / bad.version / "weights.safetensors").write_bytes(b"corrupt")
    with make_client(home) as client:
        wait_ready(client)
        assert client.get("/readyz").json()["version"] == good.version
        assert (home / "models" / "ACTIVE").read_text().strip() == bad.version  # not rewritten


def test_a_model_error_is_500_and_the_service_lives_on(
    client: TestClient, jpeg_photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    state: AppState = client.app.state.alexnet  # type: ignore[attr-defined]
    loaded = state.registry.current
    assert loaded is not None

    def boom(*a: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(state.batcher, "_run_batch", boom)
    files = {"file": ("a.jpg", jpeg_photos[0].read_bytes())}
    assert_error(client.post("/v1/classify", files=files), 500, "internal_error")
    monkeypatch.undo()
    assert client.post("/v1/classify", files=files).status_code == 200


def test_bootstrap_imagenet_imports_torchvisions_cached_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    import torchvision

    torch_home = tmp_path / "torch"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(),
               torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")  # fmt: skip
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    home = tmp_path / "home"
    with make_client(home, bootstrap="imagenet") as client:
        wait_ready(client)
        active = client.get("/v1/models/active").json()
        assert active["num_classes"] == 1000 and active["labels"][0] == "tench"
        assert active["source"] == "torchvision"
        assert (home / "models" / "ACTIVE").read_text().strip() == active["version"]


def test_cors_is_off_by_default_and_never_credentialed_with_a_wildcard(tmp_path: Path) -> None:
    origin = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    with make_client(tmp_path) as client:
        r = client.options("/v1/classify", headers=origin)
        assert "access-control-allow-origin" not in r.headers
    with make_client(tmp_path, cors_origins=["https://app.example"]) as client:
        ok = client.options("/v1/classify", headers={**origin, "Origin": "https://app.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        assert ok.headers["access-control-allow-credentials"] == "true"
        bad = client.options("/v1/classify", headers=origin)
        assert "access-control-allow-origin" not in bad.headers
    with make_client(tmp_path, cors_origins=["*"]) as client:
        r = client.get("/healthz", headers={"Origin": "https://any.example"})
        assert r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers


def test_unknown_query_parameters_are_named_not_ignored(client: TestClient) -> None:
    r = client.post("/v1/classify?topk=3", files={"file": ("a.png", b"x")})
    assert_error(r, 422, "validation_error")
    assert "topk" in r.json()["error"]["message"] and "top_k" in r.json()["error"]["message"]
    assert client.get("/?utm_source=x").status_code == 200  # the page is not an API route


def test_405_lists_every_allowed_method(client: TestClient, tmp_path: Path) -> None:
    r = client.put("/v1/classify")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    # /admin authenticates first (503 here: no token); with the token, every method of the
    # path is named, HEAD with GET
    assert_error(client.delete("/admin/jobs"), 503, "admin_disabled")
    with make_client(tmp_path, admin_token="t", run_jobs=False) as admin:
        r = admin.delete("/admin/jobs", headers={"Authorization": "Bearer t"})
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
