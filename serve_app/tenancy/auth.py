"""FastAPI dependencies: who is calling (`CurrentTenant`), is the admin calling (`require_admin`),
and the plan checks a route makes once it knows the model and parameters."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, Request

from serve_app.errors import APIError, bad_request
from serve_app.state import ServicesDep
from serve_app.tenancy.service import Tenancy, TenantContext
from telemetry import metrics
from telemetry.context import annotate, phase


async def get_tenancy(services: ServicesDep) -> Tenancy:
    if services.tenancy is None:
        raise RuntimeError("services.tenancy is not set: the ingress must build a Tenancy")
    return services.tenancy


TenancyDep = Annotated[Tenancy, Depends(get_tenancy)]


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


def api_key_from(request: Request) -> str | None:
    """`Authorization: Bearer KEY` first, then `X-API-Key: KEY`."""
    return _bearer(request) or (request.headers.get("x-api-key") or "").strip() or None


async def authenticate(request: Request, tenancy: TenancyDep) -> TenantContext:
    with phase("auth"):
        ctx = await tenancy.authenticate(api_key_from(request))
    request.state.tenant = ctx  # for access logs and metrics labels (the tenant name, never the key)
    annotate(tenant=ctx.tenant, tenant_label=metrics.tenant_label(ctx.tenant, ctx.plan.name))
    return ctx


CurrentTenant = Annotated[TenantContext, Depends(authenticate)]


async def require_admin(request: Request, tenancy: TenancyDep) -> None:
    expected = tenancy.config.admin_token
    given = _bearer(request) or ""
    if expected is None:
        raise APIError(401, "The admin API is disabled: set GENSERVE_ADMIN_TOKEN or tenancy.admin_token.",
                       code="admin_disabled", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise APIError(401, "Incorrect or missing admin token.", code="invalid_admin_token",
                       headers={"WWW-Authenticate": "Bearer"})


AdminDep = Depends(require_admin)


def ensure_model_allowed(ctx: TenantContext, model: str, aliases: Iterable[str] = ()) -> None:
    """403 if the plan doesn't include `model` (or any of its `aliases`)."""
    if ctx.plan.allows(model) or any(ctx.plan.allows(a) for a in aliases):
        return
    raise APIError(403, f"Your plan {ctx.plan.name!r} does not include the model {model!r}.",
                   param="model", code="model_not_allowed")


def visible_models(ctx: TenantContext, names: Iterable[str]) -> list[str]:
    """The models `/v1/models` should list for this tenant."""
    return [n for n in names if ctx.plan.allows(n)]


def ensure_within_plan(ctx: TenantContext, *, width: int | None = None, height: int | None = None,
                       steps: int | None = None) -> None:
    """400 if an image request exceeds the plan's max_image_side / max_steps."""
    side = ctx.plan.max_image_side
    for name, value in (("width", width), ("height", height)):
        if side is not None and value is not None and value > side:
            raise bad_request(f"{name} {value} exceeds your plan's max image side ({side}).", param=name,
                              code="plan_limit_exceeded")
    if ctx.plan.max_steps is not None and steps is not None and steps > ctx.plan.max_steps:
        raise bad_request(f"steps {steps} exceeds your plan's max steps ({ctx.plan.max_steps}).", param="steps",
                          code="plan_limit_exceeded")
