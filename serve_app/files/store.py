"""`TenantFiles`: a tenant's uploads in the result store (local files or S3), beside its images.

Layout: `{tenant_id}/uploads/{file_id}.png` (the checked, re-encoded PNG: unchecked bytes are
never stored) and `{tenant_id}/uploads/{file_id}.json` (the `FileObject`). Every lookup is under
the caller's own tenant folder, so another tenant's id is simply not found (404, as if it never
existed). The PNG is written before its metadata: a crash in between leaves an invisible orphan,
never a listed file without bytes.
"""

from __future__ import annotations

import json
import secrets
import time
from io import BytesIO

import anyio
from PIL import Image

from serve_app.errors import APIError, bad_request
from serve_app.files.protocol import PURPOSES, FileObject
from serve_app.images.config import ImageInputsConfig
from serve_app.images.inputs import FILE_ID, decode_image
from serve_app.storage import ResultStore

MAX_FILENAME = 256


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def _clean_filename(name: str | None) -> str:
    name = "".join(c for c in (name or "") if c.isprintable()).strip() or "upload.png"
    return name[-MAX_FILENAME:]


class TenantFiles:
    def __init__(self, storage: ResultStore, cfg: ImageInputsConfig) -> None:
        self.storage = storage
        self.cfg = cfg

    @staticmethod
    def _folder(tenant_id: int) -> str:
        return f"{tenant_id}/uploads"

    def _key(self, tenant_id: int, file_id: str, ext: str) -> str:
        return f"{self._folder(tenant_id)}/{file_id}.{ext}"

    async def upload(self, tenant_id: int, data: bytes, *, filename: str | None, purpose: str) -> FileObject:
        """Check the image (as any input image: 413/422 naming `file`), then store it."""
        if purpose not in PURPOSES:
            raise bad_request(f"purpose must be one of {list(PURPOSES)} (genserve stores images), got {purpose!r}.",
                              param="purpose")
        image = await anyio.to_thread.run_sync(lambda: decode_image(data, self.cfg, param="file"))
        count = sum(1 for k in await self.storage.alist_keys(self._folder(tenant_id)) if k.endswith(".json"))
        if count >= self.cfg.max_files_per_tenant:
            raise APIError(409, f"You have {count} files; the limit is {self.cfg.max_files_per_tenant}. Delete some "
                           "first.", param="file", code="too_many_files")
        with Image.open(BytesIO(image.png)) as im:
            width, height = im.size
        obj = FileObject(id=new_file_id(), bytes=len(image.png), created_at=int(time.time()),
                         filename=_clean_filename(filename), purpose=purpose,
                         sha256=image.sha256, width=width, height=height)
        await self.storage.aput(self._key(tenant_id, obj.id, "png"), image.png, "image/png")
        await self.storage.aput(self._key(tenant_id, obj.id, "json"), obj.model_dump_json().encode(),
                                "application/json")
        return obj

    async def get(self, tenant_id: int, file_id: str) -> FileObject | None:
        if not FILE_ID.fullmatch(file_id):
            return None
        raw = await self.storage.aget(self._key(tenant_id, file_id, "json"))
        return FileObject.model_validate(json.loads(raw)) if raw is not None else None

    async def read(self, tenant_id: int, file_id: str) -> bytes | None:
        """The stored PNG (images/inputs.py's `UploadSource`); None unless this tenant has it."""
        if not FILE_ID.fullmatch(file_id) or await self.get(tenant_id, file_id) is None:
            return None
        return await self.storage.aget(self._key(tenant_id, file_id, "png"))

    async def list_files(self, tenant_id: int, *, purpose: str | None = None, limit: int = 100,
                   order: str = "desc") -> list[FileObject]:
        keys = [k for k in await self.storage.alist_keys(self._folder(tenant_id)) if k.endswith(".json")]
        files = []
        for key in keys:
            raw = await self.storage.aget(key)
            if raw is not None:
                files.append(FileObject.model_validate(json.loads(raw)))
        files = [f for f in files if purpose is None or f.purpose == purpose]
        files.sort(key=lambda f: (f.created_at, f.id), reverse=order == "desc")
        return files[:limit]

    async def delete(self, tenant_id: int, file_id: str) -> bool:
        """False when the tenant has no such file. Metadata first: the id stops resolving at once."""
        if await self.get(tenant_id, file_id) is None:
            return False
        await self.storage.adelete(self._key(tenant_id, file_id, "json"))
        await self.storage.adelete(self._key(tenant_id, file_id, "png"))
        return True


__all__ = ["TenantFiles", "new_file_id"]
