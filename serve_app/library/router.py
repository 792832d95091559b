"""`/v1/templates` and `/v1/generations`. Every route acts as the calling tenant: it sees its own
templates plus the shared ones, and only its own generations (another tenant's: 404)."""

from __future__ import annotations

from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Query

from serve_app.library.generations import UrlMaker
from serve_app.library.protocol import (
    GenerationList,
    GenerationOut,
    RatingIn,
    TemplateCreate,
    TemplateList,
    TemplateOut,
)
from serve_app.library.service import Library
from serve_app.library.templates import MAX_PAGE
from serve_app.paging import Page, paging
from serve_app.state import ServicesDep
from serve_app.tenancy import CurrentTenant


async def get_library(services: ServicesDep) -> Library:
    if services.library is None:
        raise RuntimeError("services.library is not set: the ingress must build a Library")
    return services.library


LibraryDep = Annotated[Library, Depends(get_library)]

library_router = APIRouter(tags=["templates"])
PageDep = Annotated[Page, Depends(paging(default_limit=50, max_limit=MAX_PAGE))]


async def _url_maker(services: ServicesDep) -> UrlMaker | None:
    store = services.storage  # fresh URLs from stored keys
    if store is None:
        return None
    return lambda key: store.url(key)  # origin from config, never from the request


UrlMakerDep = Annotated[UrlMaker | None, Depends(_url_maker)]


@library_router.post("/v1/templates", status_code=201)
async def create_template(body: TemplateCreate, ctx: CurrentTenant, lib: LibraryDep) -> TemplateOut:
    return await to_thread.run_sync(lib.templates.save, ctx.tenant_id, body)


@library_router.get("/v1/templates")
async def list_templates(ctx: CurrentTenant, lib: LibraryDep, page: PageDep, category: str | None = None,
                         tag: str | None = None,
                         q: Annotated[str | None, Query(max_length=200)] = None) -> TemplateList:
    return await to_thread.run_sync(lambda: lib.templates.search(ctx.tenant_id, category=category, tag=tag, q=q,
                                                                 limit=page.limit, offset=page.offset))


@library_router.get("/v1/templates/{name}")
async def get_template(name: str, ctx: CurrentTenant, lib: LibraryDep,
                       version: Annotated[int | None, Query(ge=1)] = None) -> TemplateOut:
    return await to_thread.run_sync(lib.templates.get, ctx.tenant_id, name, version)


@library_router.get("/v1/templates/{name}/versions")
async def template_versions(name: str, ctx: CurrentTenant, lib: LibraryDep) -> dict[str, Any]:
    rows = await to_thread.run_sync(lib.templates.versions, ctx.tenant_id, name)
    return {"object": "list", "data": rows}


@library_router.delete("/v1/templates/{name}")
async def delete_template(name: str, ctx: CurrentTenant, lib: LibraryDep,
                          version: Annotated[int | None, Query(ge=1)] = None) -> dict[str, Any]:
    n = await to_thread.run_sync(lib.templates.delete, ctx.tenant_id, name, version)
    return {"object": "template.deleted", "name": name, "version": version, "deleted": True, "versions_deleted": n}


@library_router.post("/v1/generations/{generation_id}/rating")
async def rate_generation(generation_id: str, body: RatingIn, ctx: CurrentTenant, lib: LibraryDep,
                          url_of: UrlMakerDep) -> GenerationOut:
    return await to_thread.run_sync(lambda: lib.generations.rate(ctx.tenant_id, generation_id, body.rating, url_of))


@library_router.get("/v1/generations")
async def list_generations(ctx: CurrentTenant, lib: LibraryDep, url_of: UrlMakerDep, page: PageDep,
                           template: str | None = None, model: str | None = None, job_id: str | None = None,
                           rated: bool | None = None) -> GenerationList:
    return await to_thread.run_sync(lambda: lib.generations.list(
        ctx.tenant_id, template=template, model=model, job_id=job_id, rated=rated, limit=page.limit,
        offset=page.offset, url_of=url_of))


@library_router.get("/v1/generations/{generation_id}")
async def get_generation(generation_id: str, ctx: CurrentTenant, lib: LibraryDep,
                         url_of: UrlMakerDep) -> GenerationOut:
    return await to_thread.run_sync(lambda: lib.generations.get(ctx.tenant_id, generation_id, url_of))
