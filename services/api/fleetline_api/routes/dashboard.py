"""The web dashboard: static files under ``/dashboard/``, ``/`` redirecting there.

Plain HTML, CSS and JavaScript modules from the package's ``static/`` folder (no build
step; uPlot vendored in ``static/vendor/``). The page holds no data: it calls the REST
API and ``/v1/stream`` with the API key the user pastes in. Left out of the OpenAPI
document, and served with a Content-Security-Policy that allows no inline script or
style and no origin but this one.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent.parent / "static"
INDEX = "index.html"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self' ws: wss:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidate every time (ETag / Last-Modified): an upgrade is seen at once.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)
# Its lookup keeps every path inside the folder (no "..", no symlinks out).
_files = StaticFiles(directory=STATIC_DIR)


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=307)


@router.get("/dashboard", include_in_schema=False)
async def dashboard_without_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=307)


@router.api_route("/dashboard/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
async def dashboard(path: str, request: Request) -> Response:
    """A file of the dashboard (``index.html`` for the folder itself); 404 otherwise."""
    relative = os.path.normpath(os.path.join(*path.split("/"))) if path else INDEX
    response = await _files.get_response(relative, request.scope)
    response.headers.update(SECURITY_HEADERS)
    return response
