"""uvicorn's HTTP protocol with bounds of its own, and its parse errors in the API's error
envelope.

- A header-read deadline (below).
- A bound on the bytes of a request's head (`max_header_bytes`, 431): httptools keeps a
  header line it has not finished in memory, so 100 clients sending 10 MiB of never-ending
  header each cost 1 GB; and a bound on the connections whose head is in flight at once
  (`max_header_connections`, 429 to the next).
- A write deadline: a client whose unread answers fill the send buffer has
  `write_timeout_s` to read some, or the connection is dropped.
- Every byte of a body's framing counts (chunk sizes and extensions too): `1;` followed by
  endless extension bytes is parsed by httptools but never reaches the ASGI app's body
  limit. Past the route's limit plus a margin for framing the answer is 413.

uvicorn cancels its keep-alive timer on every byte received and has no timer while a
request's headers arrive, so a client that trickles a header byte every few seconds
(slowloris) holds a connection for ever. Here the headers of each request must be complete
within `header_timeout_s` of the connection opening (or of the previous response), else the
client gets 408 and the connection is closed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import (
    AppError,
    BadRequest,
    HeaderTooLarge,
    Overloaded,
    PayloadTooLarge,
    RequestBodyTimeout,
)


def _raw_response(err: AppError, path: str = "") -> bytes:
    """`err` in the error envelope (of `path`'s API, when the head got that far) as raw
    HTTP bytes, closing the connection: these answers go out from the protocol, below the
    ASGI app and its handlers."""
    body = json.dumps(err.body(path)).encode()
    extra = "".join(f"{k.lower()}: {v}\r\n" for k, v in (err.headers() or {}).items())
    return (
        f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
        f"content-type: application/json\r\nconnection: close\r\n{extra}"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


_TIMEOUT_RESPONSE = _raw_response(RequestBodyTimeout("request headers took too long"))
_MALFORMED_RESPONSE = _raw_response(
    BadRequest("not a valid HTTP/1.1 request (framing, Content-Length or header bytes)")
)
_FRAMING_MARGIN = 1.02  # chunk sizes and CRLFs: a few bytes per chunk of a real upload
_HEAD_END = b"\r\n\r\n"


class _HeadsInFlight:
    """Connections (of this process) that have sent part of a request head."""

    count = 0


class HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    write_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_header_connections: int = 1024
    body_limit_for: Callable[[str], int] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._in_head = True  # reading a request's head (request line and headers)
        self._head_bytes = 0
        self._head_counted = False  # counted in _HeadsInFlight
        self._tail = b""  # the last bytes of the head so far (an end split across reads)
        self._body_bytes = 0
        self._body_limit: int | None = None
        self._path = ""  # the request's path once its head is in (its API's error shape)
        self._malformed_pending = False  # a 400 to send once the requests before it are answered
        self._write_deadline: asyncio.TimerHandle | None = None
        self._running_cycle: Any = None  # the request whose app is running (pipelining)

    # ---------------------------------------------------------------- byte bounds

    def data_received(self, data: bytes) -> None:
        if self._malformed_pending:
            return  # the stream is broken: nothing after the bad request is read
        if self._in_head and not self._count_head(data):
            return
        if not self._in_head and self._body_limit is not None:
            self._body_bytes += len(data)
            if self._body_bytes > self._body_limit:
                self._refuse(PayloadTooLarge(f"the request body (with its framing) passed "
                                             f"{self._body_limit} bytes"))  # fmt: skip
                return
        super().data_received(data)

    def _count_head(self, data: bytes) -> bool:
        """Count the bytes of `data` up to the end of the head; False if refused."""
        window = self._tail + data
        end = window.find(_HEAD_END)
        head = len(data) if end < 0 else max(0, end + len(_HEAD_END) - len(self._tail))
        if head and not self._head_counted:
            if _HeadsInFlight.count >= self.max_header_connections:
                self._refuse(Overloaded("too many connections are sending request headers",
                                        retry_after_s=1))  # fmt: skip
                return False
            _HeadsInFlight.count += 1
            self._head_counted = True
        self._head_bytes += head
        self._tail = window[-3:]
        if self._head_bytes > self.max_header_bytes:
            self._refuse(HeaderTooLarge(
                f"request headers larger than {self.max_header_bytes} bytes"))  # fmt: skip
            return False
        return True

    def _release_head(self) -> None:
        if self._head_counted:
            _HeadsInFlight.count -= 1
            self._head_counted = False

    def _refuse(self, err: AppError) -> None:
        self._release_head()
        if not self.transport.is_closing():
            self.transport.write(_raw_response(err, self._path))
            self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expired(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers unparseable requests (a lying Content-Length, a malformed
        chunk, bad header bytes) in plain text, at once; here in the API's error envelope,
        and only after every request before it on the connection has been answered, in
        order (a pipelining client would otherwise take the 400 as the first request's
        answer, and those requests' answers would be written to a closed transport)."""
        if self._in_head and self._answering():  # a bad request after complete ones
            self._malformed_pending = True
            return
        self._write_malformed()  # (a bad body: the request being answered is the bad one)

    def _answering(self) -> bool:
        cycle = self.cycle
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete)

    def _write_malformed(self) -> None:
        self._malformed_pending = False
        self._mark_disconnected()  # nothing more is written after the 400
        if not self.transport.is_closing():
            self.transport.write(_MALFORMED_RESPONSE)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_head, self._body_bytes = False, 0
        self._release_head()
        self._path = self.url.split(b"?", 1)[0].decode("latin-1")
        if self.body_limit_for is not None:
            self._body_limit = int(self.body_limit_for(self._path) * _FRAMING_MARGIN) + 65536
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes, self._tail, self._path = True, 0, b"", ""

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._malformed_pending and not self._answering():
            self._write_malformed()
            return
        if not self.transport.is_closing() and not self.pipeline:
            self._arm()  # the next request's headers (an idle connection hits keep-alive first)

    # ---------------------------------------------------------------- write deadline

    def pause_writing(self) -> None:
        """The client stopped reading and our send buffer is full: it has `write_timeout_s`
        to take some of it, or the connection is dropped (a client that pipelines requests
        and never reads would otherwise hold their answers, and the connection, for ever)."""
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.write_timeout_s, self._drop)

    def _drop(self) -> None:
        """Reset the connection: a plain close would queue its FIN behind the unsent
        answers, which a client that does not read never receives."""
        self._write_deadline = None
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError, TypeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._running_cycle = cycle
        super()._start_asgi_task(cycle, app)

    def _mark_disconnected(self) -> None:
        for cycle in (self._running_cycle, self.cycle, *(c for c, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()

    def connection_lost(self, exc: Exception | None) -> None:
        # uvicorn marks only the newest request parsed as disconnected; with pipelining the
        # one running may be an earlier one, whose answer would then be written to a closed
        # transport (a RuntimeError traceback per request). Mark them all.
        self._mark_disconnected()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        self._disarm()
        self._release_head()
        super().connection_lost(exc)
        # Requests parsed but never started can never run now: drop them, and the bodies
        # they buffered, at once. Each holds its protocol (a reference cycle): left here
        # they wait for the cyclic garbage collector, which an idle server never runs (a
        # client that pipelined uploads and hung up kept ~200 MB until the next traffic).
        self.pipeline.clear()
        self.cycle = None  # type: ignore[assignment]
        self._running_cycle = None


def with_header_timeout(
    seconds: float,
    *,
    write_timeout_s: float = 30.0,
    max_header_bytes: int = 64 * 1024,
    max_header_connections: int = 1024,
    body_limit_for: Callable[[str], int] | None = None,
) -> type[HeaderDeadlineProtocol]:
    attrs: dict[str, Any] = {
        "header_timeout_s": seconds, "write_timeout_s": write_timeout_s,
        "max_header_bytes": max_header_bytes,
        "max_header_connections": max_header_connections,
        "body_limit_for": staticmethod(body_limit_for) if body_limit_for else None,
    }  # fmt: skip
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), attrs)
