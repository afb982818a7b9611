"""/docs (Swagger UI) and /redoc served from this machine: FastAPI's defaults load their scripts
and fonts from CDNs, so they stay blank offline. The scripts come from the `fastapi-offline`
package (a project dependency: Swagger UI's and Redoc's bundles, pinned by its version) and are
served at /docs-assets/; where it is not installed, both pages say so instead of staying blank."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

log = logging.getLogger("activation_server")
ASSETS_URL = "/docs-assets"
ASSETS_PACKAGE = "fastapi_offline"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
# The pages may load nothing from elsewhere: with this policy the browser makes no such request.
# Redoc's menu shows its maker's logo from a CDN (the policy would block it, with a console error):
# the bundle is served with that address pointing at the local favicon instead.
REDOC_CDN_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:"
)


def assets_dir() -> Path | None:
    """The folder holding the docs' scripts, or None when the package is missing or incomplete."""
    spec = importlib.util.find_spec(ASSETS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if all((folder / f).is_file() for f in ASSET_FILES) else None


def _local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["content-security-policy"] = CONTENT_SECURITY_POLICY
    return page


def _missing_page(which: str) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><title>API docs unavailable</title>"
        f"<h1>{which} is not available</h1>"
        "<p>Its scripts are served from this machine, by the Python package "
        "<code>fastapi-offline</code>, which is not installed here. Install it with "
        "<code>make install</code> (or <code>pip install -e .</code>) and restart the server.</p>"
        "<p>The API's description is at <a href='/openapi.json'>/openapi.json</a>.</p>",
        status_code=503,
    )


def install_docs(app: FastAPI) -> None:
    """/docs, /docs/oauth2-redirect and /redoc, their scripts from /docs-assets/. The app must be
    created with docs_url=None and redoc_url=None (FastAPI's CDN pages)."""
    folder = assets_dir()
    if folder is None:
        log.warning(
            "/docs and /redoc are unavailable: the package fastapi-offline (their scripts) is "
            "not installed; `make install` installs it"
        )
    else:
        redoc_js = (folder / "redoc.standalone.js").read_text(encoding="utf-8")
        redoc_js = redoc_js.replace(REDOC_CDN_LOGO, f"{ASSETS_URL}/favicon.png")

        @app.get(f"{ASSETS_URL}/redoc.standalone.js", include_in_schema=False)
        async def redoc_bundle() -> Response:
            return Response(redoc_js, media_type="text/javascript")

        app.mount(ASSETS_URL, StaticFiles(directory=folder), name="docs-assets")
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        if folder is None:
            return _missing_page("Swagger UI (/docs)")
        return _local_only(
            get_swagger_ui_html(
                openapi_url="/openapi.json",
                title=f"{title} - Swagger UI",
                oauth2_redirect_url="/docs/oauth2-redirect",
                swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
                swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
                # Swagger UI would otherwise fetch a validity badge from validator.swagger.io.
                swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
            )
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        if folder is None:
            return _missing_page("Redoc (/redoc)")
        return _local_only(
            get_redoc_html(
                openapi_url="/openapi.json",
                title=f"{title} - ReDoc",
                redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
                with_google_fonts=False,
            )
        )
