"""The web playground: one static page at `/` and its assets at `/static/...`, no auth (the page
asks for an API key, keeps it in the browser's localStorage and calls the public API with it)."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from serve_app.errors import not_found

STATIC_DIR = Path(__file__).parent / "static"
# Only the files shipped with the package are served: no path from the URL touches the disk.
_FILES = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}
# The page changes with each deploy; revalidating is cheap (ETag/Last-Modified from FileResponse).
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(_FILES["index.html"], media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    path = _FILES.get(name)
    if path is None:
        raise not_found(f"No static file {name!r}.", param="name", code="static_not_found")
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if media_type.startswith("text/") or media_type.endswith("javascript"):
        media_type += "; charset=utf-8"
    return FileResponse(path, media_type=media_type, headers=_HEADERS)
