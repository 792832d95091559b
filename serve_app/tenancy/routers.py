"""HTTP routes: `/admin/...` (admin token) and `GET /v1/usage` (a tenant's own usage).
Thin: each route validates, calls the Tenancy facade in a worker thread, returns its model."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from anyio import to_thread
from fastapi import APIRouter, Query

from serve_app.errors import APIError, not_found
from serve_app.tenancy.auth import AdminDep, CurrentTenant, TenancyDep
from serve_app.tenancy.protocol import (
    CreatedKey,
    KeyCreate,
    KeyInfo,
    TenantCreate,
    TenantInfo,
    TenantUpdate,
    UsageReport,
    UsageSummary,
)

admin_router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])
usage_router = APIRouter(tags=["usage"])


@admin_router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, tenancy: TenancyDep) -> TenantInfo:
    return await to_thread.run_sync(lambda: tenancy.create_tenant(body.name, body.plan))


@admin_router.get("/tenants")
async def list_tenants(tenancy: TenancyDep) -> dict:
    return {"object": "list", "data": await to_thread.run_sync(tenancy.list_tenants)}


@admin_router.get("/tenants/{name}")
async def get_tenant(name: str, tenancy: TenancyDep) -> TenantInfo:
    return await to_thread.run_sync(tenancy.get_tenant, name)


@admin_router.patch("/tenants/{name}")
async def update_tenant(name: str, body: TenantUpdate, tenancy: TenancyDep) -> TenantInfo:
    return await to_thread.run_sync(tenancy.set_plan, name, body.plan)


@admin_router.post("/tenants/{name}/keys", status_code=201)
async def create_key(name: str, body: KeyCreate, tenancy: TenancyDep) -> CreatedKey:
    if body.expires_at is not None and body.expires_in_days is not None:
        raise APIError(400, "Give expires_at or expires_in_days, not both.", param="expires_at",
                       code="invalid_value")
    expires = body.expires_at
    if body.expires_in_days is not None:
        expires = datetime.now(UTC) + timedelta(days=body.expires_in_days)
    return await to_thread.run_sync(lambda: tenancy.create_key(name, label=body.label, expires_at=expires))


@admin_router.get("/tenants/{name}/keys")
async def list_keys(name: str, tenancy: TenancyDep) -> dict:
    return {"object": "list", "data": await to_thread.run_sync(tenancy.list_keys, name)}


@admin_router.delete("/keys/{prefix}")
async def revoke_key(prefix: str, tenancy: TenancyDep) -> KeyInfo:
    return await to_thread.run_sync(tenancy.revoke_key, prefix)


@admin_router.get("/tenants/{name}/usage")
async def tenant_usage(name: str, tenancy: TenancyDep, since: date | None = None,
                       until: date | None = None) -> UsageReport:
    return await to_thread.run_sync(tenancy.usage, name, since, until)


@usage_router.get("/v1/usage")
async def own_usage(ctx: CurrentTenant, tenancy: TenancyDep,
                    tenant: str | None = Query(None, description="Only your own name is accepted.")) -> UsageSummary:
    if tenant is not None and tenant != ctx.tenant:
        # Same answer whether or not that tenant exists: nothing about others leaks.
        raise not_found(f"No tenant named {tenant!r}.", param="tenant", code="tenant_not_found")
    return await to_thread.run_sync(tenancy.usage_summary, ctx)
