"""The pages the service serves itself, with no CDN and no build step: the playground (``/``), the
operator view (``/operator``) and the API docs (``/docs``, ``/redoc``).

The playground and operator view are hand-written HTML, CSS and JavaScript under ``static/``
(packaged with the wheel). The docs pages load Swagger UI and ReDoc from the files the pinned
``fastapi-offline`` package ships, served from here, instead of FastAPI's default CDN links."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js
ASSETS_URL, DOCS_ASSETS_URL = "/assets", "/docs-assets"

# The playground and the operator view talk only to this server and load nothing from elsewhere;
# images may come from a bucket's public URL, uploads are data:/blob: URLs.
PAGE_POLICY = ("default-src 'self'; img-src * data: blob:; script-src 'self'; style-src 'self'; connect-src 'self'; "
               "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer"}
# Swagger UI and ReDoc start from an inline script; ReDoc's bundle would also show its logo from
# cdn.redoc.ly and runs its search in a blob: worker. The policy keeps the page on this server.
DOCS_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
               "frame-ancestors 'none'")
DOCS_HEADERS = {**PAGE_HEADERS, "Content-Security-Policy": DOCS_POLICY}


def install_pages(app: FastAPI) -> None:
    """Mount the assets and add the page routes (none of them in the OpenAPI schema). The app
    must be created with ``docs_url=None, redoc_url=None``: these replace FastAPI's CDN pages."""
    app.mount(ASSETS_URL, StaticFiles(directory=STATIC), name="assets")
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    favicon = f"{ASSETS_URL}/favicon.svg"

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @app.get("/operator", include_in_schema=False)
    async def operator_view() -> FileResponse:
        return FileResponse(STATIC / "operator.html", media_type="text/html", headers=PAGE_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return _with_headers(get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API docs",
            swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js", swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=favicon, oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
            # no validator badge: Swagger UI would send the schema to validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None, "defaultModelsExpandDepth": 0},
        ))

    if app.swagger_ui_oauth2_redirect_url:
        @app.get(app.swagger_ui_oauth2_redirect_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return _with_headers(get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{DOCS_ASSETS_URL}/redoc.standalone.js", redoc_favicon_url=favicon, with_google_fonts=False))


def _with_headers(page: HTMLResponse) -> HTMLResponse:
    page.headers.update(DOCS_HEADERS)
    return page
