"""Tenant, key and usage records: create, list, revoke, report. Every query binds its values."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any, overload

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from serve_app.errors import APIError, bad_request, not_found
from serve_app.tenancy import costing
from serve_app.tenancy import keys as keylib
from serve_app.tenancy.config import GpuCostConfig, TenancyConfig
from serve_app.tenancy.db import read_tx, write_tx
from serve_app.tenancy.models import ApiKey, BudgetPeriod, Tenant, UsageDaily, UsageEvent
from serve_app.tenancy.pricing import usd
from serve_app.tenancy.protocol import (
    CreatedKey,
    KeyInfo,
    ModelUsage,
    TenantInfo,
    UsageDay,
    UsageReport,
    UsageTotals,
)

T, K = Tenant.__table__, ApiKey.__table__  # Core tables: rows, not ORM objects


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def _aware(dt: datetime) -> datetime: ...


@overload
def _aware(dt: None) -> None: ...


def _aware(dt: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


def _tenant_info(t: Any) -> TenantInfo:
    return TenantInfo(name=t.name, plan=t.plan, created_at=_aware(t.created_at))


def _key_info(k: Any, tenant: str) -> KeyInfo:
    return KeyInfo(prefix=k.prefix, tenant=tenant, label=k.label, created_at=_aware(k.created_at),
                   expires_at=_aware(k.expires_at), revoked_at=_aware(k.revoked_at))


def check_plan(config: TenancyConfig, plan: str) -> None:
    if config.plan(plan) is None:
        raise bad_request(f"Unknown plan {plan!r}; configured plans: {[p.name for p in config.plans]}.",
                          param="plan", code="unknown_plan")


def tenant_not_found(name: str) -> APIError:
    return not_found(f"No tenant named {name!r}.", param="tenant", code="tenant_not_found")


def _get_tenant(conn: Connection, name: str) -> Any:
    row = conn.execute(select(T).where(T.c.name == name)).first()
    if row is None:
        raise tenant_not_found(name)
    return row


def create_tenant(engine: Engine, config: TenancyConfig, name: str, plan: str) -> TenantInfo:
    check_plan(config, plan)
    try:
        with write_tx(engine) as conn:
            conn.execute(insert(Tenant).values(name=name, plan=plan, created_at=utcnow()))
            return _tenant_info(_get_tenant(conn, name))
    except IntegrityError:
        raise APIError(409, f"A tenant named {name!r} already exists.", param="name",
                       code="tenant_exists") from None


def get_tenant(engine: Engine, name: str) -> TenantInfo:
    with read_tx(engine) as conn:
        return _tenant_info(_get_tenant(conn, name))


def list_tenants(engine: Engine) -> list[TenantInfo]:
    with read_tx(engine) as conn:
        return [_tenant_info(t) for t in conn.execute(select(T).order_by(T.c.name))]


def set_plan(engine: Engine, config: TenancyConfig, name: str, plan: str) -> TenantInfo:
    check_plan(config, plan)
    with write_tx(engine) as conn:
        if conn.execute(update(Tenant).where(Tenant.name == name).values(plan=plan)).rowcount != 1:
            raise tenant_not_found(name)
        return _tenant_info(_get_tenant(conn, name))


def create_key(engine: Engine, pepper: str, tenant: str, *, label: str | None = None,
               expires_at: datetime | None = None) -> CreatedKey:
    if expires_at is not None and expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    for _ in range(5):  # a prefix collision (48 random bits) is retried with a fresh key
        key = keylib.new_key()
        try:
            with write_tx(engine) as conn:
                t = _get_tenant(conn, tenant)
                conn.execute(insert(ApiKey).values(
                    tenant_id=t.id, prefix=keylib.key_prefix(key), key_hash=keylib.hash_key(key, pepper),
                    label=label, created_at=utcnow(), expires_at=expires_at, revoked_at=None))
                row = conn.execute(select(K).where(K.c.prefix == keylib.key_prefix(key))).one()
                return CreatedKey(key=key, **_key_info(row, t.name).model_dump(exclude={"object"}))
        except IntegrityError:
            continue
    raise RuntimeError("could not allocate a unique key prefix in 5 tries")


def list_keys(engine: Engine, tenant: str) -> list[KeyInfo]:
    with read_tx(engine) as conn:
        t = _get_tenant(conn, tenant)
        rows = conn.execute(select(K).where(K.c.tenant_id == t.id).order_by(K.c.id))
        return [_key_info(k, t.name) for k in rows]


def revoke_key(engine: Engine, prefix: str, *, tenant: str | None = None) -> KeyInfo:
    with write_tx(engine) as conn:
        q = select(K, T.c.name.label("tenant_name")).join(T, T.c.id == K.c.tenant_id).where(K.c.prefix == prefix)
        if tenant is not None:
            q = q.where(Tenant.name == tenant)
        row = conn.execute(q).first()
        if row is None:
            raise not_found(f"No API key with prefix {prefix!r}.", param="prefix", code="key_not_found")
        conn.execute(update(ApiKey).where(ApiKey.id == row.id, ApiKey.revoked_at.is_(None))
                     .values(revoked_at=utcnow()))
        k = conn.execute(select(K).where(K.c.id == row.id)).one()
        return _key_info(k, row.tenant_name)


def has_active_key(engine: Engine, tenant: str) -> bool:
    now = utcnow()
    with read_tx(engine) as conn:
        t = conn.execute(select(Tenant.id).where(Tenant.name == tenant)).scalar()
        if t is None:
            return False
        rows = conn.execute(select(ApiKey.expires_at).where(ApiKey.tenant_id == t, ApiKey.revoked_at.is_(None))).all()
        return any(e is None or _aware(e) > now for (e,) in rows)  # type: ignore[operator]


def _totals(requests: int, p: int, c: int, images: int, gpu: float, cost: int) -> dict:
    return dict(requests=int(requests or 0), prompt_tokens=int(p or 0), completion_tokens=int(c or 0),
                total_tokens=int(p or 0) + int(c or 0), images=int(images or 0), gpu_seconds=float(gpu or 0),
                cost_usd=usd(int(cost or 0)))


def usage_report(engine: Engine, tenant: str, since: date, until: date,
                 gpu_cost: GpuCostConfig | None = None) -> UsageReport:
    gpu_cost = gpu_cost or GpuCostConfig()
    with read_tx(engine) as conn:
        t = _get_tenant(conn, tenant)
        d = UsageDaily
        days = conn.execute(select(d.day, d.requests, d.prompt_tokens, d.completion_tokens, d.images,
                                   d.gpu_seconds, d.cost_micros)
                            .where(d.tenant_id == t.id, d.day >= since, d.day <= until).order_by(d.day)).all()
        e = UsageEvent
        models = conn.execute(select(e.model, func.count(), func.sum(e.prompt_tokens), func.sum(e.completion_tokens),
                                     func.sum(e.images), func.sum(e.gpu_seconds), func.sum(e.cost_micros))
                              .where(e.tenant_id == t.id, e.day >= since, e.day <= until)
                              .group_by(e.model).order_by(e.model)).all()
        cost_parts = costing.parts(conn, t.id, since, until)

    def costs(day: date | None = None, model: str | None = None) -> dict:
        return costing.cost_fields(gpu_cost, [p for p in cost_parts if (day is None or p.day == day)
                                              and (model is None or p.model == model)])

    day_rows = [UsageDay(day=r[0], **_totals(*r[1:]), **costs(day=r[0])) for r in days]
    total = UsageTotals(**_totals(
        sum(r.requests for r in day_rows), sum(r.prompt_tokens for r in day_rows),
        sum(r.completion_tokens for r in day_rows), sum(r.images for r in day_rows),
        sum(r.gpu_seconds for r in day_rows), sum(int(x[6]) for x in days)), **costs())
    return UsageReport(tenant=t.name, since=since, until=until, totals=total, days=day_rows,
                       by_model=[ModelUsage(model=r[0], **_totals(*r[1:]), **costs(model=r[0]))
                                 for r in models])


def budget_row(engine: Engine, tenant_id: int, period: str) -> tuple[int, int]:
    with read_tx(engine) as conn:
        row = conn.execute(select(BudgetPeriod.spent_micros, BudgetPeriod.reserved_micros).where(
            BudgetPeriod.tenant_id == tenant_id, BudgetPeriod.period == period)).first()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def month_start(day: date) -> date:
    return day.replace(day=1)

