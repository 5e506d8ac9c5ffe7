"""ASGI middleware of our own: security headers on every answer, and /admin
authentication before any body is read."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable

from pydantic import SecretStr

from app.errors import AdminDisabled, AppError, BadRequest, NotFound, Unauthorized, clip
from app.intake import ASGIApp, Message, Receive, Scope, Send, send_error

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
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise Unauthorized("missing or wrong bearer token")


class AdminAuthMiddleware:
    """Authenticates every /admin request before anything reads its body: an
    unauthenticated client gets 401 (or 503) whatever it sends, learns nothing from a
    parser's error, and gets no `100 Continue` (the body is never asked for)."""

    def __init__(self, app: ASGIApp, token: Callable[[], SecretStr | None]) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/admin" or path.startswith("/admin/")):
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
            send, BadRequest(f"host {clip(host, 100)!r} is not one of ALEXNET_ALLOWED_HOSTS")
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
