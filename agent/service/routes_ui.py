"""The web UI: a chat page and an audit viewer, served by the app itself (no build step, no CDN).

Where it sits: the browser face of the API. ``/ui/`` is one HTML page whose ES modules
(``/ui/static/...``) call the same endpoints any client would (threads, patients, runs, verify),
with the user's API key. The files ship inside the package (``agent/service/web``). Every page
carries a strict Content-Security-Policy: scripts and styles only from this origin, images from
here or ``data:`` URLs (thumbnails are fetched with the key and shown as data URLs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response

from agent.errors import MedagentError

router = APIRouter(include_in_schema=False)

WEB_DIR: Final = Path(__file__).parent / "web"
CSP: Final = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
#: The static files, by the name the page asks for: a fixed list, so no path ever reaches the disk.
STATIC_TYPES: Final = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page itself holds no patient data, but a stale copy could run outdated code against the API.
    "Cache-Control": "no-cache",
}


class UiFileNotFoundError(MedagentError):
    """The UI has no such file."""

    code = "ui_file_not_found"
    exit_code = 3
    http_status = 404


@router.get("/")
async def root() -> RedirectResponse:
    """Send a browser at the service root to the UI."""
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
async def ui_no_slash() -> RedirectResponse:
    """Redirect to ``/ui/`` so the page's relative URLs resolve under it."""
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/")
async def index() -> Response:
    """Return the single page (chat and audit viewer are hash routes of it)."""
    return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/ui/static/{name}")
async def static(name: str) -> Response:
    """Return one of the UI's static files.

    Raises:
        UiFileNotFoundError: the name is not one of the UI's files.
    """
    media_type = STATIC_TYPES.get(name)
    if media_type is None:
        raise UiFileNotFoundError(f"the UI has no file {name!r}")
    return FileResponse(WEB_DIR / name, media_type=media_type, headers=_HEADERS)
