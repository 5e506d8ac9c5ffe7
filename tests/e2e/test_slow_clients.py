"""Slow and hostile clients against a real server: trickled headers (slowloris) and
trickled bodies are cut off with 408 after their deadline, and others are served
meanwhile."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_version
from tests.e2e.server import Server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("home")
    make_version(home / "models", activate=True)
    with Server(home, ALEXNET_HEADER_TIMEOUT_S="2", ALEXNET_BODY_TIMEOUT_S="2") as srv:
        yield srv


def trickle(srv: Server, head: bytes, drip: bytes, stop: threading.Event) -> tuple[bytes, float]:
    """Send `head`, then one byte of `drip` every 0.25 s until the server answers or closes.
    Returns (what the server sent, seconds until it closed)."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sock.settimeout(0.25)
    t0 = time.monotonic()
    got = b""
    try:
        sock.sendall(head)
        for i in range(400):
            if stop.is_set():
                break
            try:
                sock.sendall(drip[i % len(drip) : i % len(drip) + 1])
            except OSError:
                break  # closed by the server
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break  # reset: the server closed while our bytes were still arriving
            if not chunk:
                break
            got += chunk
    finally:
        sock.close()
    return got, time.monotonic() - t0


def test_trickled_headers_get_408_and_others_are_served(
    server: Server, jpeg_photos: list[Path]
) -> None:
    stop = threading.Event()
    results: list[tuple[bytes, float]] = []
    lorises = [threading.Thread(target=lambda: results.append(trickle(
        server, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n", b"X-Slow: abcdefgh\r\n", stop)))
        for _ in range(40)]  # fmt: skip
    for t in lorises:
        t.start()
    try:
        time.sleep(0.5)
        photo = jpeg_photos[0]
        r = httpx.post(server.url + "/v1/classify", timeout=10,
                       files={"file": (photo.name, photo.read_bytes())})  # fmt: skip
        assert r.status_code == 200  # served while 40 connections trickle headers
    finally:
        for t in lorises:
            t.join(60)
        stop.set()
    assert len(results) == 40
    # Every one was cut off at its deadline; those whose 408 was not lost to the reset
    # that closing an unread socket causes got the error in the contract's shape.
    assert all(seconds < 10 for _, seconds in results), [s for _, s in results]
    answered = [got for got, _ in results if got]
    assert answered, "no client saw the 408"
    for got in answered:
        assert got.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in got, got[:200]


def test_trickled_body_gets_408(server: Server) -> None:
    head = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=B\r\nContent-Length: 100000\r\n\r\n--B\r\n")  # fmt: skip
    got, seconds = trickle(server, head, b"x", threading.Event())
    assert got.startswith(b"HTTP/1.1 408"), got[:300]
    assert b'"request_timeout"' in got
    assert seconds < 10
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200


def test_a_prompt_client_on_a_kept_alive_connection_is_not_cut(server: Server) -> None:
    with httpx.Client(timeout=10) as c:
        for _ in range(3):
            assert c.get(server.url + "/healthz").status_code == 200
            time.sleep(1.0)  # under the keep-alive and header deadlines
