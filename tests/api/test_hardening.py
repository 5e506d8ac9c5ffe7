"""Hostile-client findings that need no real socket: /admin authenticates before it parses,
names and numbers are validated whole and in ASCII, no non-finite option, no repeated
query parameter, bounded echoes, and the browser-facing headers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.helpers.api import assert_error, make_client, wait_ready
from tests.helpers.versions import make_version

TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    home = tmp_path_factory.mktemp("home")
    make_version(home / "models", activate=True)
    with make_client(home, admin_token=TOKEN, run_jobs=False, watch_active_s=0) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize("body", [b"{", b"[" * 10_000 + b"]" * 10_000, b"x" * 2_000_000, b""])
def test_admin_authenticates_before_it_reads_the_body(client: TestClient, body: bytes) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = client.post("/admin/jobs", content=body, headers={**JSON, **headers})
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"


def test_admin_disabled_whatever_the_body(tmp_path: Path) -> None:
    with make_client(tmp_path, run_jobs=False) as c:
        r = c.post("/admin/jobs", content=b"{", headers={**JSON, **AUTH})
        assert_error(r, 503, "admin_disabled")


def test_a_chunked_json_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"dataset": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    r = client.post("/admin/jobs", content=chunks(), headers={**JSON, **AUTH})
    assert_error(r, 413, "payload_too_large")


@pytest.mark.parametrize(
    "field",
    [
        {"dataset": "synthetic\n"},
        {"dataset": "cifar10\n"},
        {"dataset": "synthetic:\u0661\u0662\u0663"},  # Arabic-Indic digits
        {"dataset": "imagefolder:fl\u00f6wers"},
        {"dataset": "synthetic", "base": "v1\n"},
    ],
)
def test_names_are_matched_whole_and_in_ascii(client: TestClient, field: dict[str, str]) -> None:
    r = client.post("/admin/jobs", json=field, headers=AUTH)
    assert_error(r, 422, "validation_error")


@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e309"])
def test_non_finite_numbers_are_refused(client: TestClient, number: str) -> None:
    body = '{"dataset": "synthetic", "min_delta": ' + number + "}"
    r = client.post("/admin/jobs", content=body, headers={**JSON, **AUTH})
    assert_error(r, 422, "validation_error")


def test_repeated_query_parameters_are_refused(client: TestClient, jpeg_photos: list[Path]) -> None:
    files = {"file": ("p.jpg", jpeg_photos[0].read_bytes())}
    r = client.post("/v1/classify?top_k=1&top_k=2", files=files)
    err = assert_error(r, 422, "validation_error")
    assert "top_k" in str(err["message"])
    assert client.post("/v1/classify?top_k=2", files=files).status_code == 200


def test_echoed_input_is_bounded(client: TestClient) -> None:
    name = "v" * 60_000
    r = client.post(f"/admin/models/{name}/activate", headers=AUTH)
    assert r.status_code == 404 and len(r.text) < 2_000, len(r.text)
    r = client.get("/v1/models?" + "q" * 60_000 + "=1")
    assert r.status_code == 422 and len(r.text) < 3_000, len(r.text)


def test_the_page_and_the_api_send_browser_security_headers(client: TestClient) -> None:
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    for r in (page, client.get("/v1/models"), client.get("/nope"), client.get("/healthz")):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert "content-security-policy" in r.headers
    assert (
        client.get("/v1/models").headers["content-security-policy"].startswith("default-src 'none'")
    )


def test_head_on_every_get_route(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/v1/models", "/", "/openapi.json", "/metrics"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    r = client.head("/v1/classify")  # a POST-only route: 405 naming what it accepts
    assert r.status_code == 405 and r.headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("ctype", "status"),
    [("MULTIPART/FORM-DATA; boundary=B", 200), ("Multipart/Form-Data; boundary=B", 200),
     ("multipart/form-dataX; boundary=B", 415), ("multipart/form-data-x; boundary=B", 415)],
)  # fmt: skip
def test_media_types_are_compared_exactly_in_any_case(
    client: TestClient, jpeg_photos: list[Path], ctype: str, status: int
) -> None:
    body = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="p.jpg"\r\n\r\n'
            + jpeg_photos[0].read_bytes() + b"\r\n--B--\r\n")  # fmt: skip
    r = client.post("/v1/classify", content=body, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text


def test_metrics_method_labels_come_from_a_fixed_set(client: TestClient) -> None:
    client.request("FOOBAR", "/healthz")
    text = client.get("/metrics").text
    assert 'method="FOOBAR"' not in text and 'method="other"' in text


def test_no_redirect_built_from_the_host_header(client: TestClient) -> None:
    r = client.get("/v1/models/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers


def test_allowed_hosts(tmp_path: Path) -> None:
    with make_client(
        tmp_path, run_jobs=False, allowed_hosts=["api.example.com", "*.corp.example"]
    ) as c:
        assert c.get("/healthz", headers={"Host": "api.example.com"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "x.corp.example:8000"}).status_code == 200
        r = c.get("/healthz", headers={"Host": "rebound.attacker.example"})
        assert_error(r, 400, "invalid_request")
