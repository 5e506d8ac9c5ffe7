"""One error envelope for every non-2xx answer: {"error": {"code", "message", "details"}}.

AppError
 +-- BadRequest            400 invalid_request
 +-- InvalidImageError     400 invalid_image
 +-- Unauthorized          401 unauthorized
 +-- NotFound              404 not_found
 +-- RequestBodyTimeout    408 request_timeout
 +-- Conflict              409 conflict
 +-- PayloadTooLarge       413 payload_too_large
 +-- ImageTooLargeError    413 image_too_large
 +-- TooManyFiles          413 too_many_files
 +-- UnsupportedMediaType  415 unsupported_media_type
 +-- ValidationFailed      422 validation_error
 +-- Overloaded            429 overloaded (Retry-After)
 +-- HeaderTooLarge        431 request_header_too_large
 +-- ModelNotReady         503 model_not_ready (Retry-After)
 +-- AdminDisabled         503 admin_disabled
 +-- ReadOnly              503 read_only
 +-- RequestTimeout        504 timeout
 +-- InternalError         500 internal_error
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path

from app import paths
from app.batching import BatcherError, Closed, Expired, QueueFull
from model.images import ImageError, ImageTooLarge, UnsupportedImageFormat

log = logging.getLogger(__name__)


MAX_MESSAGE_CHARS = 1000


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Error messages may quote what a client sent (a version name, a query parameter):
    never more than `limit` characters of it, so a 60 KB name is not echoed back whole."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class AppError(Exception):
    status = 500
    code = "internal_error"

    def __init__(
        self, message: str, *, details: Any = None, retry_after_s: float | None = None
    ) -> None:
        message = clip(message)
        super().__init__(message)
        self.message, self.details, self.retry_after_s = message, details, retry_after_s

    def headers(self) -> dict[str, str] | None:
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def body(self, path: str = "") -> dict[str, Any]:
        """The envelope; under /v2 the Open Inference Protocol's own `{"error": message}`."""
        if paths.is_oip(path):
            return {"error": self.message}
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(AppError):
    status, code = 400, "invalid_request"


class InvalidImageError(AppError):
    status, code = 400, "invalid_image"


class Unauthorized(AppError):
    status, code = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(AppError):
    status, code = 404, "not_found"


class MethodNotAllowed(AppError):
    status, code = 405, "method_not_allowed"


class RequestBodyTimeout(AppError):
    """A client that sends its body too slowly (slowloris); the connection then closes."""

    status, code = 408, "request_timeout"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class Conflict(AppError):
    status, code = 409, "conflict"


class PayloadTooLarge(AppError):
    status, code = 413, "payload_too_large"


class ImageTooLargeError(AppError):
    status, code = 413, "image_too_large"


class TooManyFiles(AppError):
    status, code = 413, "too_many_files"


class UnsupportedMediaType(AppError):
    status, code = 415, "unsupported_media_type"


class ValidationFailed(AppError):
    status, code = 422, "validation_error"


class InsufficientStorage(AppError):
    status, code = 507, "insufficient_storage"


class InvalidArchive(AppError):
    status, code = 400, "invalid_archive"


class HeaderTooLarge(AppError):
    status, code = 431, "request_header_too_large"


class Overloaded(AppError):
    status, code = 429, "overloaded"


class ModelNotReady(AppError):
    status, code = 503, "model_not_ready"


class AdminDisabled(AppError):
    status, code = 503, "admin_disabled"


class ReadOnly(AppError):
    """ALEXNET_MODEL_DIR: this server serves one version folder and administers nothing."""

    status, code = 503, "read_only"


class RequestTimeout(AppError):
    status, code = 504, "timeout"


class InternalError(AppError):
    status, code = 500, "internal_error"


class ClientClosedRequest(AppError):
    """The client went away before the answer; nothing reads this (nginx's 499)."""

    status, code = 499, "client_closed_request"


def from_batcher_error(exc: BatcherError) -> AppError:
    """Translate the micro-batcher's refusals and failures at the HTTP boundary."""
    kind: type[AppError] = InternalError
    if isinstance(exc, QueueFull):
        kind = Overloaded
    elif isinstance(exc, Closed):
        kind = ModelNotReady
    elif isinstance(exc, Expired):
        kind = RequestTimeout
    return kind(str(exc), retry_after_s=exc.retry_after_s)


def from_image_error(exc: ImageError) -> AppError:
    """Translate the model core's decode errors at the HTTP boundary."""
    if isinstance(exc, UnsupportedImageFormat):
        return UnsupportedMediaType(str(exc))
    if isinstance(exc, ImageTooLarge):
        return ImageTooLargeError(str(exc))
    return InvalidImageError(str(exc))


# ----------------------------------------------------------------------------- OpenAPI


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str = Field(examples=["could not decode JPEG image: image file is truncated"])
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


_EXAMPLES: dict[int, tuple[str, str]] = {
    400: ("invalid_image", "could not decode JPEG image: image file is truncated"),
    401: ("unauthorized", "missing or wrong bearer token"),
    404: ("not_found", "no model version 'v9'"),
    409: ("conflict", "job 3 is succeeded; only interrupted or cancelled jobs resume"),
    413: ("payload_too_large", "request body is larger than 10485760 bytes"),
    415: ("unsupported_media_type", "not an accepted image format"),
    422: ("validation_error", "top_k: Input should be less than or equal to 1000"),
    429: ("overloaded", "the queue is full (256 waiting); retry after 2 s"),
    500: ("internal_error", "the model failed on this batch"),
    503: ("model_not_ready", "no model is loaded yet"),
    504: ("timeout", "the request waited longer than 10 s"),
}


RETRY_AFTER_STATUSES = (429, 503)
RETRY_AFTER_HEADER: dict[str, Any] = {
    "Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}
}


def responses(
    *statuses: int, examples: dict[int, tuple[str, str]] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries in the error envelope, each with an example (`examples`
    overrides the default (code, message) of a status)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        code, message = (examples or {}).get(status) or _EXAMPLES[status]
        entry: dict[str, Any] = {
            "model": ErrorBody,
            "description": code.replace("_", " "),
            "content": {"application/json": {"example": {"error": {
                "code": code, "message": message, "details": None}}}},
        }  # fmt: skip
        if status in RETRY_AFTER_STATUSES:
            entry["headers"] = RETRY_AFTER_HEADER
        out[status] = entry
    return out


# ----------------------------------------------------------------------------- handlers


def error_response(exc: AppError, path: str = "") -> JSONResponse:
    return JSONResponse(exc.body(path), status_code=exc.status, headers=exc.headers())


def _allowed_methods(request: Request) -> set[str]:
    """The methods the OpenAPI schema documents for this request's path."""
    path = request.scope.get("path", "")
    for template, operations in request.app.openapi()["paths"].items():
        regex, _, _ = compile_path(template)
        if regex.match(path):
            methods = {m.upper() for m in operations}
            return methods | {"HEAD"} if "GET" in methods else methods
    return set()


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        return error_response(exc, request.scope["path"])

    @app.exception_handler(BatcherError)
    async def _batcher_error(request: Request, exc: BatcherError) -> JSONResponse:
        return error_response(from_batcher_error(exc), request.scope["path"])

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client hung up while its body was being read (or uvicorn dropped a
        # malformed connection): no one will read this answer, and it is not our error.
        return error_response(
            ClientClosedRequest("the client disconnected mid-request"), request.scope["path"]
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"][1:] or first["loc"])
        return error_response(
            ValidationFailed(f"{where}: {first['msg']}", details=errors), request.scope["path"]
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err: AppError
        if exc.status_code == 404:
            err = NotFound("no such route")
        elif exc.status_code == 405:
            err = MethodNotAllowed("method not allowed on this route")
            # RFC 9110: list every method the path accepts (Starlette names only the first
            # route that matched the path; GET and POST /admin/jobs are two routes).
            allowed = _allowed_methods(request)
            if allowed:
                resp = error_response(err, request.scope["path"])
                resp.headers["Allow"] = ", ".join(sorted(allowed))
                return resp
        elif exc.status_code == 413:
            err = PayloadTooLarge(str(exc.detail))
        elif exc.status_code == 400 and isinstance(exc.__cause__, AppError):
            # FastAPI turns whatever fails while it reads a JSON body into a 400; the body
            # limit's 413 and deadline's 408 keep their own status
            err = exc.__cause__
        elif exc.status_code == 400:
            err = BadRequest(str(exc.detail))
        else:
            err = AppError(str(exc.detail))
            err.status, err.code = exc.status_code, "http_error"
        resp = error_response(err, request.scope["path"])
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            InternalError("internal error; see the server log"), request.scope["path"]
        )
