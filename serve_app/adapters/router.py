"""`/v1/adapters`: a tenant's own LoRA adapters, plus the global ones its plan may use.

Upload is multipart/form-data: `file` (a zip of a PEFT LoRA directory), `name`, `base_model` (a
configured model name or alias). Private adapters of other tenants are 404, like missing ones.
"""

from __future__ import annotations

from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Depends, File, Form, UploadFile

from serve_app.adapters.protocol import AdapterDeleted, AdapterList, AdapterOut
from serve_app.adapters.registry import MAX_PAGE, AdapterRegistry
from serve_app.errors import bad_request
from serve_app.paging import Page, paging
from serve_app.state import ServicesDep
from serve_app.tenancy import CurrentTenant

router = APIRouter(tags=["adapters"])
PageDep = Annotated[Page, Depends(paging(default_limit=50, max_limit=MAX_PAGE))]


async def get_registry(services: ServicesDep) -> AdapterRegistry:
    if services.adapters is None:
        raise RuntimeError("services.adapters is not set: the ingress must build an AdapterRegistry")
    return services.adapters


RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]


@router.post("/v1/adapters", status_code=201)
async def upload_adapter(ctx: CurrentTenant, reg: RegistryDep, file: Annotated[UploadFile, File()],
                         name: Annotated[str, Form(max_length=64)],
                         base_model: Annotated[str, Form(max_length=128)]) -> AdapterOut:
    limit = reg.config.max_upload_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise bad_request(f"The adapter archive exceeds {limit} bytes.", param="file", code="adapter_too_large")
    if not data:
        raise bad_request("The adapter archive is empty.", param="file", code="invalid_adapter")
    adapter = await to_thread.run_sync(lambda: reg.create(
        ctx.tenant_id, name=name, base_model=base_model, data=data, max_adapters=ctx.plan.max_adapters))
    return AdapterOut.of(adapter)


@router.get("/v1/adapters")
async def list_adapters(ctx: CurrentTenant, reg: RegistryDep, page: PageDep) -> AdapterList:
    rows = await to_thread.run_sync(lambda: reg.list(ctx.tenant_id, allow_global=ctx.plan.global_adapters,
                                                     limit=page.limit, offset=page.offset))
    return AdapterList(data=[AdapterOut.of(a) for a in rows])


@router.get("/v1/adapters/{adapter}")
async def get_adapter(adapter: str, ctx: CurrentTenant, reg: RegistryDep) -> AdapterOut:
    a = await to_thread.run_sync(lambda: reg.get(ctx.tenant_id, adapter, allow_global=ctx.plan.global_adapters))
    return AdapterOut.of(a)


@router.delete("/v1/adapters/{adapter}")
async def delete_adapter(adapter: str, ctx: CurrentTenant, reg: RegistryDep) -> AdapterDeleted:
    a = await to_thread.run_sync(reg.delete, ctx.tenant_id, adapter)
    return AdapterDeleted(id=a.id, name=a.name)
