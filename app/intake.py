"""Upload intake: each route's body limit, multipart parsing with bounds, and decoding in
a thread pool (the middleware that enforces the limits is in app/middleware.py). Filenames are only ever echoed back, never used as paths."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from app import paths
from app.errors import (
    BadRequest,
    PayloadTooLarge,
    TooManyFiles,
    UnsupportedMediaType,
)
from model.images import DecodeLimits
from model.predictor import Predictor

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the files
JSON_BODY_LIMIT = 1024 * 1024  # admin request bodies
FEEDBACK_BODY_LIMIT = 4096  # POST /v1/feedback: an id and a label


def infer_body_limit(max_upload_bytes: int, max_files: int) -> int:
    """/v2 infer: a batch of files, base64 in JSON (4/3) or raw with the binary extension
    (also the most a compressed body may inflate to)."""
    return max_upload_bytes * max_files * 4 // 3 + MULTIPART_OVERHEAD


def body_limits(max_upload_bytes: int, max_files: int,
                max_dataset_bytes: int = 0) -> Callable[[str], int]:  # fmt: skip
    """The body limit of each path (the one function the ASGI middleware and the protocol's
    framing count share)."""
    single = max_upload_bytes + MULTIPART_OVERHEAD
    batch = max_upload_bytes * max_files + MULTIPART_OVERHEAD
    dataset = max_dataset_bytes + MULTIPART_OVERHEAD
    infer = infer_body_limit(max_upload_bytes, max_files)

    def limit_for(path: str) -> int:
        if path == paths.CLASSIFY:
            return single
        if path == paths.CLASSIFY_BATCH:
            return batch
        if max_dataset_bytes and paths.is_dataset_upload(path):
            return dataset
        if paths.is_infer(path):
            return infer
        if path == paths.FEEDBACK:
            return FEEDBACK_BODY_LIMIT
        return JSON_BODY_LIMIT

    return limit_for


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


# Media types a raw-body upload may declare: any image/*, or no claim at all. The bytes
# still decide the format (model/images.py sniffs them); the type only picks the parser.
RAW_BODY_TYPES = ("image/", "application/octet-stream")
RAW_BODY_HINT = ("send the image as multipart/form-data (curl -F file=@photo.jpg ...) or "
                 "as the body itself with Content-Type image/jpeg, image/png, ... or "
                 "application/octet-stream (curl --data-binary @photo.jpg -H "
                 "'Content-Type: image/jpeg' ...)")  # fmt: skip


def media_type(request: Request) -> str:
    """The request's media type, lower case, without its parameters."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def is_raw_body(media: str) -> bool:
    return media.startswith(RAW_BODY_TYPES[0]) or media == RAW_BODY_TYPES[1]


async def read_body(request: Request, max_bytes: int, what: str = "the image") -> bytes:
    """A raw-body upload, keeping at most `max_bytes + 1` bytes: a larger body is 413 like
    an oversized multipart file (the rest is read and dropped, within the path's body limit
    that the middleware enforces, so the answer reaches a client still sending)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        if size <= max_bytes:
            chunks.append(chunk)
        size += len(chunk)
    if size > max_bytes:
        raise PayloadTooLarge(f"{what} is larger than {max_bytes} bytes")
    return b"".join(chunks)


async def read_form(request: Request, *, max_files: int, max_file_bytes: int) -> FormData:
    """Parse multipart/form-data with bounds on files and fields. A body that ends before
    its closing boundary is malformed (400), not a form with the last part missing."""
    ctype = request.headers.get("content-type", "")
    # The media type exactly, in any case (RFC 9110: case-insensitive); its parameters after
    main, params = parse_options_header(ctype)
    if main.strip().lower() != b"multipart/form-data":
        raise UnsupportedMediaType("send the images as multipart/form-data fields 'files' "
                                   "(curl -F files=@a.jpg -F files=@b.jpg ...)"
                                   if max_files > 1 else RAW_BODY_HINT)  # fmt: skip
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

    async def __call__(self, data: bytes, predictor: Predictor) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, predictor.decode, data, self.limits)
