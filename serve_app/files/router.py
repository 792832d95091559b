"""`/v1/files`: upload (multipart `file` + `purpose`), list, retrieve, delete — the tenant's own only."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from starlette.datastructures import UploadFile

from serve_app.errors import bad_request, not_found
from serve_app.files.protocol import FileDeleted, FileList, FileObject
from serve_app.files.store import TenantFiles
from serve_app.state import ServicesDep
from serve_app.tenancy import CurrentTenant

router = APIRouter(tags=["files"])


async def get_files(services: ServicesDep) -> TenantFiles:
    if services.files is None:
        raise RuntimeError("services.files is not set: the ingress must build TenantFiles")
    return services.files


FilesDep = Annotated[TenantFiles, Depends(get_files)]


def _missing(file_id: str) -> Exception:
    return not_found(f"No such file: {file_id!r}.", param="file_id", code="file_not_found")


@router.post("/v1/files", response_model=FileObject)
async def upload_file(request: Request, files: FilesDep, ctx: CurrentTenant) -> FileObject:
    form = await request.form()
    unknown = sorted(set(form.keys()) - {"file", "purpose"})
    if unknown:
        raise bad_request(f"Unknown field {unknown[0]!r}; a file upload takes `file` and `purpose`.", param=unknown[0],
                          code="unknown_field")
    upload, purpose = form.getlist("file"), form.get("purpose")
    if len(upload) != 1 or not isinstance(upload[0], UploadFile):
        raise bad_request("Send exactly one `file` part (an image).", param="file", code="missing_file")
    if not isinstance(purpose, str):
        raise bad_request("`purpose` is required (`vision` or `user_data`).", param="purpose", code="missing_purpose")
    return await files.upload(ctx.tenant_id, await upload[0].read(), filename=upload[0].filename, purpose=purpose)


@router.get("/v1/files", response_model=FileList)
async def list_files(files: FilesDep, ctx: CurrentTenant, purpose: str | None = Query(None, max_length=32),
                     limit: int = Query(100, ge=1, le=10_000), order: Literal["asc", "desc"] = "desc") -> FileList:
    return FileList(data=await files.list_files(ctx.tenant_id, purpose=purpose, limit=limit, order=order))


@router.get("/v1/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str, files: FilesDep, ctx: CurrentTenant) -> FileObject:
    obj = await files.get(ctx.tenant_id, file_id)
    if obj is None:
        raise _missing(file_id)
    return obj


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, files: FilesDep, ctx: CurrentTenant) -> FileDeleted:
    if not await files.delete(ctx.tenant_id, file_id):
        raise _missing(file_id)
    return FileDeleted(id=file_id, deleted=True)
