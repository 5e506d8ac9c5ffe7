"""uvicorn's HTTP protocol with a header-read deadline, and its parse errors in the API's
error envelope.

uvicorn cancels its keep-alive timer on every byte received and has no timer while a
request's headers arrive, so a client that trickles a header byte every few seconds
(slowloris) holds a connection for ever. Here the headers of each request must be complete
within `header_timeout_s` of the connection opening (or of the previous response), else the
client gets 408 and the connection is closed."""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import AppError, BadRequest, RequestBodyTimeout


def _raw_response(err: AppError) -> bytes:
    """`err` in the API's error envelope as raw HTTP bytes, closing the connection: these
    answers go out from the protocol, below the ASGI app and its handlers."""
    body = json.dumps(err.body()).encode()
    return (
        f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
        f"content-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


_TIMEOUT_RESPONSE = _raw_response(RequestBodyTimeout("request headers took too long"))
_MALFORMED_RESPONSE = _raw_response(
    BadRequest("not a valid HTTP/1.1 request (framing, Content-Length or header bytes)")
)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

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
        chunk, bad header bytes) in plain text; here in the API's error envelope."""
        self.transport.write(_MALFORMED_RESPONSE)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._arm()  # the next request's headers (an idle connection hits keep-alive first)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def with_header_timeout(seconds: float) -> type[HeaderDeadlineProtocol]:
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": seconds})
