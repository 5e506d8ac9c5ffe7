"""Slow and hostile clients against one real server: trickled headers (slowloris) and
trickled bodies are cut off with 408 after their deadline while others are served; 1,000
files or fields, a huge multipart preamble, a multipart without its end boundary, a
Content-Length that lies and malformed framing are each answered with a 4xx in the error
envelope or closed. At the end the server's peak memory is bounded, its log holds no
traceback and it still serves."""

from __future__ import annotations

import itertools
import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers.server import Server, proc_status_kb
from tests.helpers.versions import make_version

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("home")
    make_version(home / "models", activate=True)
    with Server(home, ALEXNET_HEADER_TIMEOUT_S="2", ALEXNET_BODY_TIMEOUT_S="2",
                ALEXNET_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
                ALEXNET_MAX_HEADER_CONNECTIONS=str(HEAD_CONNECTIONS),
                ALEXNET_WRITE_TIMEOUT_S="2", ALEXNET_MEMORY_TRIM_S="0.5",
                ALEXNET_MAX_UPLOAD_BYTES_IN_FLIGHT=str(IN_FLIGHT)) as srv:  # fmt: skip
        # Warm up with the largest ordinary request (a full batch), then reset the peak:
        # what the hostile requests add on top of normal serving is what is measured.
        photo = sorted(photo_dir.glob("*.jpg"))[0].read_bytes()
        files = [("files", (f"{i}.jpg", photo)) for i in range(32)]
        assert (
            httpx.post(srv.url + "/v1/classify/batch", files=files, timeout=60).status_code == 200
        )
        reset_peak_rss(srv)
        srv.rss_start = proc_status(srv, "VmRSS")  # type: ignore[attr-defined]
        yield srv


UPLOAD_LIMIT = 1024 * 1024  # per file; /v1/classify takes this plus 64 KiB of multipart
HEAD_CONNECTIONS = 64  # connections sending request headers at once (the slowloris test: 40)
IN_FLIGHT = 40 * 1024 * 1024  # upload bytes being received at once, all connections together


def reset_peak_rss(srv: Server) -> None:
    """Reset the process's VmHWM to its current RSS (Linux: clear_refs 5)."""
    assert srv.proc is not None
    try:
        Path(f"/proc/{srv.proc.pid}/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here: {exc}")


def proc_status(srv: Server, field: str) -> int:
    """A memory figure of the server process from /proc, in bytes."""
    assert srv.proc is not None
    return proc_status_kb(srv.proc.pid, field) * 1024


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


@pytest.mark.parametrize("way", ["multipart", "raw body"])
def test_trickled_body_gets_408(server: Server, way: str) -> None:
    ctype = WAYS[way][0] or "multipart/form-data; boundary=B"
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            "Content-Length: 100000\r\n\r\n").encode() + (b"--B\r\n" if way == "multipart" else b"")  # fmt: skip
    got, seconds = trickle(server, head, b"x", threading.Event())
    assert got.startswith(b"HTTP/1.1 408"), got[:300]
    assert b'"request_timeout"' in got
    assert got.lower().count(b"\r\nconnection: close") == 1, got[:300]  # one, not two
    assert seconds < 10
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200


def test_a_prompt_client_on_a_kept_alive_connection_is_not_cut(server: Server) -> None:
    with httpx.Client(timeout=10) as c:
        for _ in range(3):
            assert c.get(server.url + "/healthz").status_code == 200
            time.sleep(1.0)  # under the keep-alive and header deadlines


# ------------------------------------------------------------------ hostile requests


@dataclass
class Reply:
    status: int | None  # None: the connection closed (or was reset) without a response
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after (or instead of) answering
    sent: int  # request bytes the server took before it stopped reading

    def error_code(self) -> str:
        return str(json.loads(self.body)["error"]["code"])


def exchange(srv: Server, chunks: Iterable[bytes], wait_s: float = 15) -> Reply:
    """Send `chunks` on one connection, stopping early if the server answers or closes;
    then read what it sent until it closes the connection or `wait_s` passes."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=wait_s)
    got, sent, closed = b"", 0, False
    try:
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # an early answer (or a close): stop sending like a real client would
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not _complete(got):
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True  # reset
                break
            if not data:
                closed = True
                break
            got += data
        if got and not closed:  # answered: is the connection closed after the response?
            sock.settimeout(0.5)
            try:
                closed = sock.recv(1) == b""
            except TimeoutError:
                closed = False
            except OSError:
                closed = True
    finally:
        sock.close()
    if not got:
        return Reply(None, {}, b"", closed, sent)
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (h.split(":", 1) for h in lines[1:]))
    return Reply(int(lines[0].split()[1]), headers, body, closed, sent)


def _complete(got: bytes) -> bool:
    head, sep, body = got.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def post(path: str, body: bytes, boundary: str = "B", extra: str = "",
         length: int | None = None, ctype: str | None = None) -> bytes:  # fmt: skip
    """A raw multipart POST (or of `ctype`: the image itself as the body); `length`
    overrides the true Content-Length."""
    n = len(body) if length is None else length
    ctype = ctype or f"multipart/form-data; boundary={boundary}"
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {n}\r\n{extra}\r\n").encode() + body  # fmt: skip


# The two ways to upload one image to /v1/classify: (Content-Type, body for an image).
WAYS = {
    "multipart": (None, lambda data: part("file", data, "a.jpg") + END),
    "raw body": ("image/jpeg", lambda data: data),
}


def part(name: str, data: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--B\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


END = b"--B--\r\n"


@pytest.fixture(scope="module")
def photo(jpeg_photos: list[Path]) -> bytes:
    return jpeg_photos[0].read_bytes()


def assert_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers.get("content-type") == "application/json"
    assert reply.error_code() == code, reply.body


def test_a_thousand_files_are_413(server: Server) -> None:
    body = b"".join(part("files", b"x" * 10, f"f{i}.jpg") for i in range(1000)) + END
    assert_error(exchange(server, [post("/v1/classify/batch", body)]), 413, "too_many_files")
    assert_error(exchange(server, [post("/v1/classify", body)]), 413, "too_many_files")


def test_a_thousand_fields_are_400(server: Server, photo: bytes) -> None:
    body = part("file", photo, "a.jpg") + b"".join(part(f"f{i}", b"v") for i in range(1000))
    reply = exchange(server, [post("/v1/classify", body + END)])
    assert_error(reply, 400, "invalid_request")
    assert "fields" in reply.error_code() or b"fields" in reply.body


def test_a_huge_preamble_is_cut_off_at_the_body_limit(server: Server) -> None:
    """200 MB of preamble streamed without a Content-Length: refused once the bytes pass
    the route's limit; the server stops reading long before the 200 MB."""
    head = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\n\r\n")  # fmt: skip
    mib = b"\r\n" * (512 * 1024)  # CVE-2024-53981: the parser once logged every byte
    chunk = b"%x\r\n%b\r\n" % (len(mib), mib)
    reply = exchange(server, itertools.chain([head], itertools.repeat(chunk, 200)))
    assert reply.sent < 50 * len(chunk), reply.sent  # socket buffers hold a few MB at most
    assert reply.closed
    if reply.status is not None:  # else the 413 was lost to the reset of the unread bytes
        assert_error(reply, 413, "payload_too_large")


def test_a_preamble_under_the_limit_is_skipped(server: Server, photo: bytes) -> None:
    """Half a MiB of line breaks before the first boundary is skipped; a text preamble is
    not accepted by the parser (400), which is fine for an image upload API."""
    body = part("file", photo, "p.jpg") + END
    reply = exchange(server, [post("/v1/classify", b"\r\n" * (256 * 1024) + body)])
    assert reply.status == 200, reply.body[:300]
    assert json.loads(reply.body)["predictions"]
    reply = exchange(server, [post("/v1/classify", b"this is a preamble\r\n" + body)])
    assert_error(reply, 400, "invalid_request")


def test_a_multipart_without_its_end_boundary_is_400(server: Server, photo: bytes) -> None:
    unterminated = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
    for body in (part("file", photo, "a.jpg"), unterminated + photo, b"--B\r\n"):
        reply = exchange(server, [post("/v1/classify", body)])
        assert reply.status == 400, (reply.status, reply.body[:300])
        assert reply.error_code() == "invalid_request"


def test_a_huge_part_header_is_refused(server: Server) -> None:
    body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + b"a" * 200_000
            + b'"\r\n\r\nxx\r\n' + END)  # fmt: skip
    reply = exchange(server, [post("/v1/classify", body)])
    assert reply.status in (400, 413), (reply.status, reply.body[:300])


@pytest.mark.parametrize("way", ["multipart", "raw body"])
def test_a_content_length_that_promises_more_than_comes_is_408(
    server: Server, photo: bytes, way: str
) -> None:
    ctype, make = WAYS[way]
    body = make(photo)
    t0 = time.monotonic()
    reply = exchange(server, [post("/v1/classify", body, length=len(body) + 5000, ctype=ctype)])
    assert_error(reply, 408, "request_timeout")
    assert reply.closed, "the connection stays open with an unread body"
    assert time.monotonic() - t0 < 10  # the 2 s body deadline, not the client's patience


@pytest.mark.parametrize("way", ["multipart", "raw body"])
def test_a_content_length_that_promises_more_then_hangs_up(
    server: Server, photo: bytes, way: str
) -> None:
    """The client half-closes after sending less than it declared: nothing to answer, the
    connection closes, the server logs no error."""
    ctype, make = WAYS[way]
    body = make(photo)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    try:
        sock.sendall(post("/v1/classify", body, length=len(body) + 5000, ctype=ctype))
        sock.shutdown(socket.SHUT_WR)
        got = sock.recv(65536)
    except ConnectionResetError:
        got = b""
    finally:
        sock.close()
    assert got == b"" or got.startswith(b"HTTP/1.1 4"), got[:300]


def test_a_content_length_that_promises_less_than_comes(server: Server, photo: bytes) -> None:
    """The declared length cuts the multipart short (400); the bytes after it are not a
    request (400, malformed HTTP) and the connection is closed."""
    body = part("file", photo, "a.jpg") + END
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    got = b""
    try:
        sock.sendall(post("/v1/classify", body, length=len(body) // 2))
        while data := sock.recv(65536):
            got += data
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    statuses = re.findall(rb"HTTP/1.1 (\d{3}) ", got)
    assert statuses and all(s == b"400" for s in statuses), got[:600]
    assert b'"invalid_request"' in got


@pytest.mark.parametrize("headers", [
    "Content-Length: 10\r\nTransfer-Encoding: chunked\r\n",  # request smuggling
    "Content-Length: abc\r\n",
    "Content-Length: -5\r\n",
    "Content-Length: 10\r\nContent-Length: 20\r\n",
    "Transfer-Encoding: chunked\r\n",  # followed by a malformed chunk size
])  # fmt: skip
def test_malformed_framing_is_400_in_the_envelope(server: Server, headers: str) -> None:
    raw = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
           f"boundary=B\r\n{headers}\r\nzz\r\n0123456789\r\n0\r\n\r\n").encode()  # fmt: skip
    reply = exchange(server, [raw])
    assert_error(reply, 400, "invalid_request")


def test_a_header_flood_is_431_before_it_is_buffered(server: Server) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Flood: "
    flood = itertools.chain([head], itertools.repeat(b"a" * 65536, 160))  # 10 MiB, unfinished
    reply = exchange(server, flood)
    assert_error(reply, 431, "request_header_too_large")
    # answered while the header is still unfinished, and closed (what the client could push
    # into the kernel's socket buffers meanwhile says nothing of what the server kept)
    assert reply.closed
    # Many header lines add up the same way.
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(100))
    reply = exchange(server, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n"])
    assert_error(reply, 431, "request_header_too_large")
    # Headers just under the limit are fine.
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(50))
    reply = exchange(server, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n"])
    assert reply.status == 200


def test_connections_sending_headers_at_once_are_bounded(server: Server) -> None:
    socks = []
    try:
        for _ in range(HEAD_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"c" * 30_000)
            socks.append(sock)
        deadline = time.monotonic() + 30  # until the server has read all of them
        while True:
            reply = exchange(server, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"])
            if reply.status != 200 or time.monotonic() > deadline:
                break
        assert_error(reply, 429, "overloaded")
        assert int(reply.headers["retry-after"]) >= 1
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server notices the closed connections
        if exchange(server, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"]).status == 200:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the server did not free its header slots")


@pytest.mark.parametrize("size_line", [b"1;" + b"e" * 64, b"0" * 64])
def test_chunk_framing_counts_against_the_body_limit(server: Server, size_line: bytes) -> None:
    """Endless chunk-extension bytes, or endless leading zeros in a chunk size: every byte
    of the framing counts, so the answer is 413 near the limit, not after gigabytes."""
    head = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\n\r\n")  # fmt: skip
    filler = b"e" * 65536 if size_line.startswith(b"1") else b"0" * 65536
    flood = itertools.chain([head, size_line], itertools.repeat(filler, 320))  # 20 MiB
    reply = exchange(server, flood)
    assert_error(reply, 413, "payload_too_large")
    assert reply.closed


def _read_until_closed(sock: socket.socket, wait_s: float = 30) -> bytes:
    got = b""
    sock.settimeout(wait_s)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            got += data
    except (TimeoutError, ConnectionResetError):
        pass
    return got


def test_pipelined_requests_are_answered_in_order_before_the_400(
    server: Server, photo: bytes
) -> None:
    """Two uploads, then garbage, on one connection in one write: both are answered, in
    order, then the 400 goes out and the connection closes; nothing is logged as an error."""
    log_before = len(server.log.read_bytes())
    one = post("/v1/classify", part("file", photo, "p.jpg") + END)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(one + one + b"GARBAGE\r\n\r\n")
    got = _read_until_closed(sock)
    sock.close()
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", got)]
    assert statuses == [200, 200, 400], (statuses, got[-500:])
    assert got.count(b'"predictions"') == 2 and b"invalid_request" in got
    new_log = server.log.read_bytes()[log_before:]
    assert b"Traceback" not in new_log and b"ERROR" not in new_log, new_log[-2000:]


def test_a_pipelining_client_that_hangs_up_leaves_no_traceback(
    server: Server, photo: bytes
) -> None:
    log_before = len(server.log.read_bytes())
    one = post("/v1/classify", part("file", photo, "p.jpg") + END)
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(one * 4)
        sock.close()  # gone before any answer
    r = httpx.post(server.url + "/v1/classify", files={"file": ("a.jpg", photo)}, timeout=30)
    assert r.status_code == 200
    new_log = server.log.read_bytes()[log_before:]
    assert b"Traceback" not in new_log and b"ERROR" not in new_log, new_log[-2000:]


def test_a_client_that_never_reads_its_answers_is_dropped(server: Server) -> None:
    """Hundreds of pipelined requests for the OpenAPI document, never read: once the send
    buffers are full the client has the write deadline (2 s here) to read, then the
    connection is dropped; meanwhile others are served."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 400)
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        deadline = time.monotonic() + 60  # a generous bound on "dropped after ~2 s"
        dropped = False
        while time.monotonic() < deadline and not dropped:
            dropped = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
            if not dropped:
                time.sleep(0.1)
        assert dropped, "the server still holds a connection whose client never reads"
    finally:
        sock.close()


def _spooled_bytes(srv: Server) -> int:
    """Bytes in the server's open temp files (spooled multipart parts, already unlinked)."""
    assert srv.proc is not None
    total = 0
    for fd in Path(f"/proc/{srv.proc.pid}/fd").iterdir():
        try:
            if "(deleted)" in str(fd.readlink()) or "/tmp" in str(fd.readlink()):
                total += fd.stat().st_size
        except OSError:
            continue
    return total


def test_an_oversized_file_part_is_never_spooled_whole(server: Server, photo: bytes) -> None:
    """A 20 MiB file part (limit 1 MiB) in a batch: at most the limit of it reaches the temp
    disk, that file alone gets 413 and the other file is classified."""
    big = b"\xff\xd8\xff" + b"\0" * (20 * 1024 * 1024)
    body = part("files", photo, "good.jpg") + part("files", big, "big.jpg") + END
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _spooled_bytes(server))
            done.wait(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        reply = exchange(server, [post("/v1/classify/batch", body)], wait_s=60)
    finally:
        done.set()
        sampler.join()
    assert reply.status == 200, reply
    good, too_big = json.loads(reply.body)["results"]
    assert "predictions" in good and too_big["error"]["code"] == "payload_too_large"
    assert peak[0] < 3 * UPLOAD_LIMIT, f"{peak[0]} bytes spooled"


def test_a_websocket_upgrade_is_answered_in_the_envelope(server: Server) -> None:
    raw = (b"GET /v1/classify HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
    assert_error(exchange(server, [raw]), 404, "not_found")


def test_upload_bytes_in_flight_have_a_global_budget(server: Server, photo: bytes) -> None:
    """Two batches each holding back their last bytes after ~25 MiB (the batch limit is
    32 MiB here): together past the 40 MiB budget, so a third upload is refused with 429
    and Retry-After before its body is read; once they end, uploads are taken again."""
    body = (
        part("files", photo, "good.jpg") + part("files", b"\0" * (25 * 1024 * 1024), "x.jpg") + END
    )
    holders = []
    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(post("/v1/classify/batch", body)[:-10])  # all but the end
            holders.append(sock)
        deadline = time.monotonic() + 30  # until the server has read what they sent
        while True:
            reply = exchange(server, [post("/v1/classify", part("file", photo, "p.jpg") + END)])
            if reply.status != 200 or time.monotonic() > deadline:
                break
        assert_error(reply, 429, "overloaded")
        assert int(reply.headers["retry-after"]) >= 1
    finally:
        for sock in holders:
            sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = httpx.post(server.url + "/v1/classify", files={"file": ("a.jpg", photo)}, timeout=30)
        if r.status_code == 200:
            break
    assert r.status_code == 200, r.text


def test_after_all_that_memory_is_bounded_and_nothing_crashed(server: Server, photo: bytes) -> None:
    """Run last in this module: the server's peak RSS rose by a bounded amount over the
    hostile requests above, the memory they freed went back to the OS (app/memory.py),
    its log has no traceback, and it serves."""
    start = server.rss_start  # type: ignore[attr-defined]
    peak = proc_status(server, "VmHWM")
    print(f"peak RSS over the hostile requests: +{(peak - start) / 2**20:.0f} MiB")
    assert peak - start < 200 * 1024 * 1024, f"peak RSS grew by {(peak - start) / 2**20:.0f} MiB"
    r = httpx.post(server.url + "/v1/classify", files={"file": ("a.jpg", photo)}, timeout=15)
    assert r.status_code == 200
    # Within 10% of the warm size once the trimmer has run (every 0.5 s here); without it
    # the server stayed 55% above (bench/attack_memory.py, docs/benchmarks.md).
    bound = start * 1.10
    deadline = time.monotonic() + 30
    while (now := proc_status(server, "VmRSS")) > bound and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"RSS warm {start / 2**20:.0f} MiB, peak {peak / 2**20:.0f}, now {now / 2**20:.0f}")
    assert now <= bound, f"RSS {now / 2**20:.0f} MiB, warm {start / 2**20:.0f} MiB"
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    returned = re.search(r"^alexnet_memory_returned_bytes_total (\S+)$", metrics, re.M)
    assert returned and float(returned.group(1)) > 0, "the trimmer never returned memory"
    assert re.search(r"^process_resident_memory_bytes \S+$", metrics, re.M)
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
