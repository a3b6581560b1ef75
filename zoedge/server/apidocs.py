"""Interactive API docs that work offline: Swagger UI at /docs and ReDoc at /redoc, served from the JavaScript and
CSS files that the `fastapi-offline` package ships (in the server extra), never from a CDN. Fleet servers and
devices run without internet access by design; FastAPI's own pages load their assets from jsdelivr and stay blank.

Without the package the pages say how to install it (the API and /openapi.json work regardless)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
MISSING = ("<!doctype html><title>API docs</title><p>The offline API docs need the <code>fastapi-offline</code> "
           "package: <code>pip install 'zoedge[server]'</code> (or <code>pip install fastapi-offline</code>). "
           "The schema is at <a href=\"/openapi.json\">/openapi.json</a>.</p>")


def assets_dir() -> Optional[Path]:
    """The directory of the packaged Swagger UI / ReDoc assets, or None when fastapi-offline is not installed."""
    try:
        root = Path(str(resources.files("fastapi_offline"))) / "static"
    except (ModuleNotFoundError, TypeError):
        return None
    return root if all((root / name).is_file() for name in ASSETS) else None


def install(app: FastAPI) -> None:
    """Add /docs, /docs/oauth2-redirect and /redoc (the app must be created with docs_url=None, redoc_url=None)."""
    static = assets_dir()
    if static is not None:
        app.mount(ASSETS_URL, StaticFiles(directory=str(static)), name="docs-assets")
    title = app.title

    def page(request: Request, render: Callable[[str, str, str], HTMLResponse]) -> HTMLResponse:
        """render(root, openapi_url, assets_url), under the request's root_path (behind a proxy); 503 without assets."""
        if static is None:
            return HTMLResponse(MISSING, status_code=503)
        root = request.scope.get("root_path", "")
        return render(root, f"{root}{app.openapi_url}", f"{root}{ASSETS_URL}")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        return page(request, lambda root, openapi, assets: get_swagger_ui_html(
            openapi_url=openapi, title=f"{title} - Swagger UI", oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js", swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png"))

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        return page(request, lambda _root, openapi, assets: get_redoc_html(
            openapi_url=openapi, title=f"{title} - ReDoc", redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png", with_google_fonts=False))
