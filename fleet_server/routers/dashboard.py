"""The web dashboard and the API docs, both served from files in the package: nothing comes from a CDN.

The pages hold no fleet data: the dashboard's script asks the admin API with the token the operator
signs in with (kept in the tab's sessionStorage), so nothing is readable without an admin token. A strict
Content-Security-Policy allows only this server's own scripts (no inline script, nothing from elsewhere).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from fleet_server.errors import NotFound

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

_DASHBOARD = Path(str(resources.files("fleet_server") / "dashboard"))
_ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_SECURITY = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
             "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
_SWAGGER_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}


def _swagger_dir() -> Path:
    import swagger_ui  # swagger-ui-py: Swagger UI 5 (OpenAPI 3.1, which FastAPI writes), as files in the package

    return Path(swagger_ui.__file__).parent / "static"


@router.get("/")
def root() -> RedirectResponse:
    """The dashboard."""
    return RedirectResponse("/dashboard", status_code=307)


@router.get("/dashboard")
def dashboard() -> Response:
    """The dashboard's page (sign-in first; data only through the admin API)."""
    return FileResponse(_DASHBOARD / "index.html", media_type="text/html", headers=_SECURITY)


@router.get("/dashboard/assets/{name}")
def dashboard_asset(name: str) -> Response:
    """The dashboard's script and style sheet (a fixed list of files)."""
    if name not in _ASSETS:
        raise NotFound(f"no dashboard asset '{name}'", "The dashboard is at /dashboard.")
    return FileResponse(_DASHBOARD / name, media_type=_ASSETS[name], headers=_SECURITY)


@router.get("/docs")
def docs() -> HTMLResponse:
    """Swagger UI on /openapi.json, its files served from the swagger-ui-py package."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="edgekit fleet server - API", swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs/assets/swagger-ui.css", swagger_favicon_url="/docs/assets/favicon-32x32.png")


@router.get("/docs/assets/{name}")
def docs_asset(name: str) -> Response:
    """Swagger UI's files (a fixed list)."""
    if name not in _SWAGGER_FILES:
        raise NotFound(f"no docs asset '{name}'", "The API docs are at /docs.")
    return FileResponse(_swagger_dir() / name, media_type=_SWAGGER_FILES[name], headers={"Cache-Control": "max-age=86400"})
