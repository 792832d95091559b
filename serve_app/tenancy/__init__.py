"""Tenants, plans, API keys, exact rate limits, the usage ledger and budgets (issue 4).

The ingress builds one `Tenancy` per replica (`services.tenancy`), protects routes with
`CurrentTenant`, and wraps each request in `await tenancy.admit(...)` ... `await adm.settle()`.
"""

from serve_app.tenancy.auth import (
    CurrentTenant,
    TenancyDep,
    api_key_from,
    authenticate,
    ensure_model_allowed,
    ensure_within_plan,
    get_tenancy,
    require_admin,
    visible_models,
)
from serve_app.tenancy.bootstrap import ensure_local_tenant
from serve_app.tenancy.config import LocalTenantConfig, PlanConfig, PricesConfig, TenancyConfig
from serve_app.tenancy.metering import MeteredStreamingResponse, metered
from serve_app.tenancy.routers import admin_router, usage_router
from serve_app.tenancy.service import Admission, Tenancy, TenantContext

__all__ = [
    "Admission", "CurrentTenant", "LocalTenantConfig", "MeteredStreamingResponse", "PlanConfig",
    "PricesConfig", "Tenancy", "TenancyConfig", "TenancyDep", "TenantContext", "admin_router", "api_key_from",
    "authenticate", "ensure_local_tenant", "ensure_model_allowed", "ensure_within_plan", "get_tenancy",
    "metered", "require_admin", "usage_router", "visible_models",
]
