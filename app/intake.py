"""Upload intake: the streaming body limit, multipart parsing with bounds, and decoding in a
thread pool. Filenames are only ever echoed back, never used as paths."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Final

import torch
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from app.errors import (
    AppError,
    BadRequest,
    Overloaded,
    PayloadTooLarge,
    RequestBodyTimeout,
    TooManyFiles,
    UnsupportedMediaType,
)
from model.images import DecodeLimits, decode_image, to_tensor
from model.transforms import EvalTransform

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the files
JSON_BODY_LIMIT = 1024 * 1024  # admin request bodies
UPLOAD_PATHS: Final = frozenset({"/v1/classify", "/v1/classify/batch"})


def body_limits(max_upload_bytes: int, max_files: int) -> Callable[[str], int]:
    """The body limit of each path (the one function the ASGI middleware and the protocol's
    framing count share)."""
    single = max_upload_bytes + MULTIPART_OVERHEAD
    batch = max_upload_bytes * max_files + MULTIPART_OVERHEAD

    def limit_for(path: str) -> int:
        if path == "/v1/classify":
            return single
        if path == "/v1/classify/batch":
            return batch
        return JSON_BODY_LIMIT

    return limit_for


class BodyLimitMiddleware:
    """Refuse a request body over its route's limit while it is being read: at once when
    Content-Length says so, else as soon as the streamed bytes pass the limit (413
    payload_too_large), before the body is spooled anywhere. The whole body must arrive
    within `body_timeout_s` of its first read (408), and a response sent before the body
    was read to its end closes the connection.

    Upload bytes in flight (received by requests not finished yet, in memory or spooled to
    disk) have a budget across all connections, `max_in_flight_bytes`: past it a new upload
    is refused with 429 and Retry-After before any of its body is read."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int],
                 body_timeout_s: float = 60.0, max_in_flight_bytes: int = 0,
                 upload_paths: frozenset[str] = UPLOAD_PATHS) -> None:  # fmt: skip
        self.app, self.limit_for, self.body_timeout_s = app, limit_for, body_timeout_s
        self.max_in_flight_bytes, self.upload_paths = max_in_flight_bytes, upload_paths
        self.in_flight_bytes = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False  # h11/httptools reject malformed lengths themselves
            if too_big:
                await send_error(send, PayloadTooLarge(
                    f"request body is {int(declared)} bytes; the limit here is {limit}"))  # fmt: skip
                return
        upload = scope["path"] in self.upload_paths
        if upload and self.max_in_flight_bytes and self.in_flight_bytes >= self.max_in_flight_bytes:
            await send_error(send, Overloaded(
                f"{self.in_flight_bytes} bytes of uploads are being received; retry shortly",
                retry_after_s=1))  # fmt: skip
            return
        received = 0
        body_done = False
        deadline: float | None = None  # the whole body within body_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_done, deadline
            if body_done:  # later receives wait for a disconnect: no deadline
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.body_timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise RequestBodyTimeout(
                    f"the request body did not arrive within {self.body_timeout_s:g} s"
                ) from None
            if message["type"] == "http.request":
                n = len(message.get("body", b""))
                received += n
                if upload:
                    self.in_flight_bytes += n
                if received > limit:
                    raise PayloadTooLarge(f"request body is larger than {limit} bytes")
                body_done = not message.get("more_body", False)
            return message

        # A response that goes out before the body was read to its end (413, 408, 401, a
        # malformed multipart) closes the connection: the unread rest is not worth
        # draining, and a client streaming a never-ending body cannot keep the connection.
        has_body = declared not in (None, b"0") or b"transfer-encoding" in headers

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and has_body and not body_done:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"connection" for k, _ in headers):  # (a 408 has one)
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, limited_receive, closing_send)
        finally:
            if upload:
                self.in_flight_bytes -= received


async def send_error(send: Send, err: AppError) -> None:
    """`err` in the error envelope from a raw ASGI middleware (below the app's handlers),
    closing the connection: the request's body is left unread."""
    import json

    body = json.dumps(err.body()).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (err.headers() or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *extra]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class _BoundedFilesParser(MultiPartParser):
    """Starlette's parser, keeping at most `max_file_bytes + 1` bytes of each file part: the
    rest streams past without being spooled to disk, and `read_upload` then answers 413 for
    that file (a batch's other files are still classified). Without it a 200 MiB part was
    written to /tmp whole before the per-file limit was checked."""

    def __init__(self, *args: Any, max_file_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_file_bytes = max_file_bytes
        self._file_bytes = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._file_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:
            room = self.max_file_bytes + 1 - self._file_bytes
            if room <= 0:
                return
            end = min(end, start + room)
            self._file_bytes += end - start
        super().on_part_data(data, start, end)


async def read_form(request: Request, *, max_files: int, max_file_bytes: int) -> FormData:
    """Parse multipart/form-data with bounds on files and fields. A body that ends before
    its closing boundary is malformed (400), not a form with the last part missing."""
    ctype = request.headers.get("content-type", "")
    # The media type exactly, in any case (RFC 9110: case-insensitive); its parameters after
    main, params = parse_options_header(ctype)
    if main.strip().lower() != b"multipart/form-data":
        raise UnsupportedMediaType(
            "send the image as multipart/form-data (curl -F file=@photo.jpg ...)"
        )
    closing = b"--" + params.get(b"boundary", b"") + b"--"
    seen = _Marker(closing)
    parser = _BoundedFilesParser(request.headers, seen.watch(request.stream()),
                                 max_files=max_files, max_fields=16, max_part_size=64 * 1024,
                                 max_file_bytes=max_file_bytes)  # fmt: skip
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise TooManyFiles(f"at most {max_files} file(s) per request") from exc
        raise BadRequest(f"malformed multipart body: {exc.message}") from exc
    if not seen.found:
        await form.close()
        raise BadRequest(
            f"malformed multipart body: it ends before the closing boundary {closing.decode('latin-1')}"
        )
    return form


class _Marker:
    """Watches a byte stream for `marker`, across chunk edges."""

    def __init__(self, marker: bytes) -> None:
        self.marker, self.found = marker, False

    async def watch(self, stream: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        tail = b""
        async for chunk in stream:
            if not self.found and chunk:
                window = tail + chunk
                self.found = self.marker in window
                tail = window[-(len(self.marker) - 1) :]
            yield chunk


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{upload.filename or 'file'} is larger than {max_bytes} bytes")
    return data


@dataclass(frozen=True)
class Decoder:
    """Decodes and preprocesses uploads on a thread pool, off the event loop."""

    limits: DecodeLimits
    executor: Any  # concurrent.futures.Executor

    def _decode(self, data: bytes, transform: EvalTransform) -> torch.Tensor:
        img = decode_image(data, limits=self.limits, min_side=transform.pre.min_side)
        return transform(to_tensor(img))

    async def __call__(self, data: bytes, transform: EvalTransform) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._decode, data, transform)
