"""`GET /files/{key}?expires=&sig=`: the local backend's files, for whoever holds a signed URL.

No API key here (the URL is the credential, like a presigned S3 URL). Bad or expired signature:
403; a signed URL for a file that is gone: 404.
"""

from __future__ import annotations

import mimetypes
import time

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from serve_app.errors import APIError, not_found
from serve_app.state import ServicesDep
from serve_app.storage.base import InvalidKeyError, ResultStore
from serve_app.storage.local import LocalResultStore

files_router = APIRouter(tags=["files"])


def get_store(services: ServicesDep) -> ResultStore:
    if services.storage is None:
        raise RuntimeError("services.storage is not set: the ingress must build a ResultStore")
    return services.storage


def _forbidden(message: str) -> APIError:
    return APIError(403, message, param="sig", code="invalid_signature")


@files_router.api_route("/files/{key:path}", methods=["GET", "HEAD"], response_model=None)
def get_file(key: str, services: ServicesDep, expires: int = Query(0), sig: str = Query("", max_length=128)
             ) -> FileResponse:
    # A sync route: FastAPI runs it in a worker thread, so the file-system calls don't block the loop.
    store = get_store(services)
    if not isinstance(store, LocalResultStore):
        raise not_found("Files are served by the object store, not here.", param="key")
    try:
        path = store.path_of(key)
    except InvalidKeyError:
        raise _forbidden("Invalid file URL signature.") from None
    if not store.verify(key, expires, sig):
        if _signed_but_expired(store, key, expires, sig):
            raise _forbidden("This file URL has expired; request a new one.")
        raise _forbidden("Invalid file URL signature.")
    if not path.is_file():
        raise not_found(f"File {key!r} does not exist.", param="key", code="file_not_found")
    max_age = max(0, expires - int(time.time()))
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media, headers={
        "Cache-Control": f"private, max-age={max_age}", "X-Content-Type-Options": "nosniff"})


def _signed_but_expired(store: LocalResultStore, key: str, expires: int, sig: str) -> bool:
    return store.verify(key, expires, sig, now=float("-inf"))
