"""The service's own ASGI middleware, all of it: metrics of every request, security headers
on every answer, /admin authentication before any body is read, the body limits, deadline
and in-flight upload budget, HEAD, allowed hosts, and no websockets. `create_app`
(app/main.py) stacks them; the protocol below them is app/protocol.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

if TYPE_CHECKING:
    from app.state import AppState

from app import paths
from app.errors import (
    AdminDisabled,
    AppError,
    BadRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestBodyTimeout,
    Unauthorized,
    clip,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# For JSON, images and plain text: nothing to load, run or frame.
API_CSP = "default-src 'none'; frame-ancestors 'none'"
_BASE_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


def page_csp(html: str) -> str:
    """A Content-Security-Policy for the upload page: its own inline <script> and <style>
    by hash (nothing else inline runs), images from this server and blob:/data: URLs (the
    previews and loss plots), fetches to this server only, and no framing (the page holds
    an admin-token field)."""

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
            for b in bodies
        )

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src 'self' blob: data:; connect-src 'self'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    )


class SecurityHeadersMiddleware:
    """Adds nosniff, no framing, no referrer and a Content-Security-Policy (`API_CSP`
    unless the route set its own) to every HTTP answer."""

    def __init__(self, app: ASGIApp, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self.app = app
        self.fixed = [*_BASE_HEADERS, *extra]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in self.fixed if k not in present]
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", API_CSP.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def check_admin_token(token: SecretStr | None, authorization: str | None) -> None:
    """503 admin_disabled without a configured token; 401 unless `authorization` is
    `Bearer <token>` (compared in constant time: the time taken does not tell how much of
    the token matched)."""
    if token is None or not token.get_secret_value():
        raise AdminDisabled("the admin API is disabled: set ALEXNET_ADMIN_TOKEN to enable it")
    if not bearer_matches(token, authorization):
        raise Unauthorized("missing or wrong bearer token")


def bearer_matches(token: SecretStr, authorization: str | None) -> bool:
    """Whether `authorization` is `Bearer <token>`, compared in constant time (the time
    taken does not tell how much of the token matched)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode())


class AdminAuthMiddleware:
    """Authenticates every /admin request before anything reads its body: an
    unauthenticated client gets 401 (or 503) whatever it sends, learns nothing from a
    parser's error, and gets no `100 Continue` (the body is never asked for)."""

    def __init__(self, app: ASGIApp, token: Callable[[], SecretStr | None]) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (
            path == paths.ADMIN_PREFIX or path.startswith(paths.ADMIN_PREFIX + "/")
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization")
        try:
            check_admin_token(self.token(), auth.decode("latin-1") if auth else None)
        except AppError as err:
            await send_error(send, err)
            return
        await self.app(scope, receive, send)


class HeadMiddleware:
    """HEAD on every GET route (RFC 9110; load balancers probe with it): answered as the
    GET would be, headers and all, without the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class AllowedHostsMiddleware:
    """ALEXNET_ALLOWED_HOSTS: answer only requests whose Host is listed (DNS rebinding: a
    web page on another name resolving to this server); `*.example.com` matches subdomains.
    400 in the error envelope otherwise."""

    def __init__(self, app: ASGIApp, hosts: list[str]) -> None:
        self.app, self.hosts = app, [h.lower() for h in hosts]

    def allowed(self, host: str) -> bool:
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.lower()
        return any(name == h or (h.startswith("*.") and name.endswith(h[1:])) for h in self.hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if self.allowed(host):
            await self.app(scope, receive, send)
            return
        await send_error(
            send,
            BadRequest(f"host {clip(host, 100)!r} is not one of ALEXNET_ALLOWED_HOSTS"),
            scope.get("path", ""),
        )


class NoWebSocketMiddleware:
    """This API has no websocket endpoint: an upgrade request is answered in the error
    envelope (404, through the ASGI websocket denial-response extension) rather than with
    the server's bare 403."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        await receive()  # websocket.connect
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        err = NotFound("no websocket endpoint here: this API is plain HTTP")
        body = json.dumps(err.body()).encode()
        await send({"type": "websocket.http.response.start", "status": err.status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "websocket.http.response.body", "body": body})


# Metric labels from a fixed set: any token is a valid method to the parser, and each new
# label value would be a new time series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class MetricsMiddleware:
    """Counts requests by route template and status, and their total latency."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            state: AppState | None = getattr(scope["app"].state, "alexnet", None)
            route = getattr(scope.get("route"), "path", "unmatched")
            if state is not None:
                method = scope["method"] if scope["method"] in _METHODS else "other"
                state.metrics.requests.labels(route, method, str(status)).inc()
                state.metrics.latency.labels(route).observe(time.perf_counter() - t0)
                if status >= 400:
                    state.metrics.rejections.labels(str(status)).inc()


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
                 is_upload: Callable[[str], bool] = paths.is_upload,
                 dataset_body_timeout_s: float | None = None) -> None:  # fmt: skip
        self.app, self.limit_for, self.body_timeout_s = app, limit_for, body_timeout_s
        # A dataset archive (hundreds of MB) gets longer than an image to arrive.
        self.dataset_body_timeout_s = dataset_body_timeout_s or body_timeout_s
        self.max_in_flight_bytes, self.is_upload = max_in_flight_bytes, is_upload
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
                    f"request body is {int(declared)} bytes; the limit here is {limit}"),
                    scope["path"])  # fmt: skip
                return
        upload = self.is_upload(scope["path"])
        if upload and self.max_in_flight_bytes and self.in_flight_bytes >= self.max_in_flight_bytes:
            await send_error(send, Overloaded(
                f"{self.in_flight_bytes} bytes of uploads are being received; retry shortly",
                retry_after_s=1), scope["path"])  # fmt: skip
            return
        received = 0
        body_done = False
        deadline: float | None = None  # the whole body within body_timeout_s
        timeout_s = (self.dataset_body_timeout_s if paths.is_dataset_upload(scope["path"])
                     else self.body_timeout_s)  # fmt: skip

        async def limited_receive() -> Message:
            nonlocal received, body_done, deadline
            if body_done:  # later receives wait for a disconnect: no deadline
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise RequestBodyTimeout(
                    f"the request body did not arrive within {timeout_s:g} s"
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


async def send_error(send: Send, err: AppError, path: str = "") -> None:
    """`err` in the error envelope (of `path`'s API) from a raw ASGI middleware (below the
    app's handlers), closing the connection: the request's body is left unread."""
    body = json.dumps(err.body(path)).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (err.headers() or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *extra]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
