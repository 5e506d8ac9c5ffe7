"""Behaviour that only a real uvicorn server shows: streaming limits, overload, deadlines,
graceful shutdown; and parity between the server and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers.cli import run_cli
from tests.helpers.server import Server
from tests.helpers.versions import encode, make_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def _post_many(url: str, data: bytes, n: int, path: str = "/v1/classify",
                     mixed: bool = False, raw: bool = False) -> list[httpx.Response]:  # fmt: skip
    """`n` uploads at once, as multipart; `raw`: all as the raw body (image/jpeg); `mixed`:
    the even ones raw, the odd ones multipart."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(
            c.post(url + path, content=data, headers={"content-type": "image/jpeg"})
            if raw or (mixed and i % 2 == 0)
            else c.post(url + path, files={"file": ("p.jpg", data)})
            for i in range(n)))  # fmt: skip


def _by_way(responses: list[httpx.Response]) -> tuple[set[int], set[int]]:
    """The status codes of a `mixed` run's raw-body and multipart uploads."""
    codes = [r.status_code for r in responses]
    return set(codes[0::2]), set(codes[1::2])


def test_served_prediction_equals_alexnet_predict(tmp_path: Path, jpeg_photos: list[Path]) -> None:
    home = tmp_path / "home"
    make_version(home / "models", activate=True, image_size=96)
    with Server(home) as srv:
        served = [httpx.post(srv.url + "/v1/classify", files={"file": (p.name, p.read_bytes())}).json()
                  for p in jpeg_photos[:2]]  # fmt: skip
    # one file per call: batches of one on both sides, so the same kernels run (bf16 results
    # depend slightly on the batch's size)
    cli = [json.loads(run_cli("predict", "active", str(p), "--json", home=home).stdout)[0]
           for p in jpeg_photos[:2]]  # fmt: skip
    for s, c in zip(served, cli, strict=True):
        assert [p["index"] for p in s["predictions"]] == [p["index"] for p in c["predictions"]]
        for a, b in zip(s["predictions"], c["predictions"], strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)


def test_body_limit_is_enforced_while_streaming(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_version(home / "models", activate=True)
    with Server(home, ALEXNET_MAX_UPLOAD_BYTES="100000") as srv:
        # Declared too large: refused before any body byte is read.
        r = httpx.post(srv.url + "/v1/classify", content=b"x" * 300_000,
                       headers={"content-type": "multipart/form-data; boundary=b"})  # fmt: skip
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        # The image itself as the body: classified with a length and chunked; too large 413.
        photo = encode(Image.new("RGB", (200, 150), (30, 120, 200)), "JPEG")
        raw = {"content-type": "image/jpeg"}
        for content in (photo, iter([photo[:999], photo[999:]])):
            r = httpx.post(srv.url + "/v1/classify", content=content, headers=raw)
            assert r.status_code == 200 and len(r.json()["predictions"]) == 5, r.text
        r = httpx.post(srv.url + "/v1/classify", content=b"x" * 300_000, headers=raw)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        # Chunked, no Content-Length: refused once the streamed bytes pass the limit, while
        # the client still has 9 MB to send.
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")  # fmt: skip
        preamble = (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n"
        )
        sock.sendall(b"%x\r\n%s\r\n" % (len(preamble), preamble))
        chunk = b"a" * 65536
        sent, answer = 0, b""
        # (a generous wait per chunk: what is checked is that the server answers long
        # before the 10 MB are sent, not how fast)
        sock.settimeout(0.25)
        try:
            while sent < 10_000_000 and b"\r\n\r\n" not in answer:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                with contextlib.suppress(TimeoutError):
                    answer += sock.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(5)
        try:
            while b"}" not in answer:
                part = sock.recv(65536)
                if not part:
                    break
                answer += part
        except (TimeoutError, ConnectionResetError):
            pass
        sock.close()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"payload_too_large" in answer
        assert sent < 3_000_000
        assert httpx.get(srv.url + "/healthz").status_code == 200


def test_overload_answers_429_with_retry_after(tmp_path: Path, jpeg_photos: list[Path]) -> None:
    home = tmp_path / "home"
    make_version(home / "models", activate=True, num_classes=1000, image_size=224)
    data = jpeg_photos[0].read_bytes()
    with Server(home, ALEXNET_MAX_QUEUE="2", ALEXNET_MAX_BATCH_SIZE="1",
                ALEXNET_PRECISION="fp32") as srv:  # fmt: skip
        for raw in (False, True):  # the same admission for multipart and raw-body uploads
            responses = asyncio.run(_post_many(srv.url, data, 40, raw=raw))
            codes = [r.status_code for r in responses]
            assert 200 in codes and 429 in codes, (raw, codes)
            for rejected in (r for r in responses if r.status_code == 429):
                assert rejected.json()["error"]["code"] == "overloaded"
                assert int(rejected.headers["Retry-After"]) >= 1
            assert set(codes) <= {200, 429}
        # and it recovers at once
        assert (
            httpx.post(srv.url + "/v1/classify", files={"file": ("a.jpg", data)}).status_code == 200
        )


def test_requests_past_their_deadline_get_504(tmp_path: Path, jpeg_photos: list[Path]) -> None:
    home = tmp_path / "home"
    # A lone request finishes well within the 1 s deadline on any machine; 300 at once at
    # 448 px in batches of one need several seconds of compute even on a fast CPU, so the
    # later ones pass their deadline (and are dropped before compute).
    make_version(home / "models", activate=True, num_classes=1000, image_size=448)
    data = jpeg_photos[0].read_bytes()
    with Server(home, ALEXNET_REQUEST_TIMEOUT_S="1", ALEXNET_MAX_BATCH_SIZE="1",
                ALEXNET_PRECISION="fp32", ALEXNET_MAX_QUEUE_WAIT_S="0",
                ALEXNET_MAX_QUEUE="1000", ALEXNET_DEVICE="cpu") as srv:  # fmt: skip
        alone = httpx.post(srv.url + "/v1/classify", files={"file": ("a.jpg", data)}, timeout=60)
        assert alone.status_code == 200, alone.text
        responses = asyncio.run(_post_many(srv.url, data, 300, mixed=True))
        codes = [r.status_code for r in responses]
        assert 504 in codes, codes
        raw, multipart = _by_way(responses)
        assert 504 in raw and 504 in multipart, codes  # the same deadline, both ways
        for late in (r for r in responses if r.status_code == 504):
            assert late.json()["error"]["code"] == "timeout"
        assert set(codes) <= {200, 504}


def test_forwarded_headers_are_believed_only_from_configured_proxies(tmp_path: Path) -> None:
    """X-Forwarded-For from a client that is not a configured proxy is ignored (uvicorn
    alone trusts 127.0.0.1); with ALEXNET_FORWARDED_ALLOW_IPS naming the proxy it is used.
    The access log shows which address was taken."""
    home = tmp_path / "home"
    make_version(home / "models", activate=True)
    spoof = {"X-Forwarded-For": "203.0.113.9"}
    with Server(home, ALEXNET_LOG_LEVEL="info") as srv:
        assert httpx.get(srv.url + "/healthz", headers=spoof).status_code == 200
        assert httpx.get(srv.url + "/readyz").status_code == 200  # (the log line is written)
        log = srv.log.read_text()
    assert "203.0.113.9" not in log and "127.0.0.1:" in log
    home2 = tmp_path / "home2"
    make_version(home2 / "models", activate=True)
    with Server(home2, ALEXNET_LOG_LEVEL="info", ALEXNET_FORWARDED_ALLOW_IPS="127.0.0.1") as srv:
        assert httpx.get(srv.url + "/healthz", headers=spoof).status_code == 200
        assert httpx.get(srv.url + "/readyz").status_code == 200
        assert "203.0.113.9" in srv.log.read_text()
