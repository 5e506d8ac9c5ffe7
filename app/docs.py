"""The OpenAPI docs pages (/docs, /redoc) and /favicon.ico, all served from this process:
Swagger UI's and ReDoc's assets come from the installed fastapi-offline package, not a CDN,
so the docs work with no network."""

from __future__ import annotations

import io

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageDraw

# fastapi_offline/static holds swagger-ui-bundle.js, swagger-ui.css and redoc.standalone.js.
ASSETS_URL = "/static/docs"
FAVICON_URL = "/favicon.ico"
# The docs pages may load only from this server. ReDoc puts a logo from its CDN in the side
# menu (hidden when it fails to load); this keeps even that request from leaving the machine.
# Both pages run an inline script or inline styles, hence 'unsafe-inline'.
DOCS_CSP = "default-src 'self' 'unsafe-inline' data: blob:"


def favicon_ico() -> bytes:
    """A 32x32 icon drawn here (three top-k bars on the page's accent blue), so no binary
    file lives in the repository."""
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle((0, 0, 31, 31), radius=6, fill=(47, 111, 222, 255))
    for i, width in enumerate((22, 15, 9)):
        draw.rectangle((5, 6 + 8 * i, 5 + width, 10 + 8 * i), fill=(255, 255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="ICO", sizes=[(32, 32)])
    return buf.getvalue()


def install_docs(app: FastAPI) -> None:
    """Add /docs, its OAuth2 redirect, /redoc, their assets and the favicon to an app made
    with `docs_url=None, redoc_url=None`. None of it is in the schema."""
    # A Mount, not an APIRoute: the app-wide reject_unknown_query dependency does not run
    # for it, and BodyLimitMiddleware gives these bodiless GETs the default JSON limit.
    app.mount(ASSETS_URL, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs")
    icon = favicon_ico()
    title = app.title
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        r = root(request)
        page = get_swagger_ui_html(
            openapi_url=f"{r}{app.openapi_url}",
            title=f"{title} - Swagger UI",
            oauth2_redirect_url=f"{r}{redirect_url}",
            swagger_js_url=f"{r}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{r}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{r}{FAVICON_URL}",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        r = root(request)
        page = get_redoc_html(
            openapi_url=f"{r}{app.openapi_url}",
            title=f"{title} - ReDoc",
            redoc_js_url=f"{r}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{r}{FAVICON_URL}",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get(FAVICON_URL, include_in_schema=False)
    async def favicon() -> Response:
        return Response(icon, media_type="image/x-icon",
                        headers={"Cache-Control": "public, max-age=86400"})  # fmt: skip
