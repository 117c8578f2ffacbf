"""The demo page at `/`: one HTML file with its script and style sheet, no build step.

The files live in `service/static/` inside the package, so a wheel (package-data in
pyproject.toml) and the container (which copies `service/`) both carry them. The page calls
the same public API as any client (`/health`, `/predict`, `/predict/batch`); nothing is
fetched from anywhere else, which its Content-Security-Policy enforces in the browser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Everything from this origin only; `blob:` for the previews of the files a person picks.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# Revalidate on every load (answered 304 by ETag when unchanged), so a browser never pairs
# a new page with an old cached script after an upgrade.
_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY}

web_router = APIRouter(include_in_schema=False)


@web_router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers=_HEADERS)


class _RevalidatedStaticFiles(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(_HEADERS)
        return response


def mount_page(app: FastAPI) -> None:
    """Serve the page at `/` and its files under `/static/`."""
    app.include_router(web_router)
    app.mount("/static", _RevalidatedStaticFiles(directory=STATIC_DIR), name="static")
