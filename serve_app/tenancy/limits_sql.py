"""Rate windows and concurrency slots in the app database (SQLite or Postgres).

Every check is one `INSERT ... ON CONFLICT DO UPDATE SET used = used + :n WHERE used + :n <= :limit
RETURNING used`: the database evaluates the condition on the locked, latest row, so concurrent
replicas can never both pass on the same last unit. No row returned = refused. The caller runs
`acquire` inside one write transaction (with the budget hold), so a refusal rolls back everything.
"""

from __future__ import annotations

import uuid
from collections import Counter

from sqlalchemy import Connection, case, delete, select, update

from serve_app.tenancy.limits import Grant, Need, Rejected, window_start
from serve_app.tenancy.models import InFlight, InFlightLease, RateCounter
from serve_app.tenancy.statements import statement


def acquire(conn: Connection, tenant_id: int, needs: list[Need], concurrency: int | None, *,
            now: float, window_s: int, lease_ttl_s: int) -> Grant:
    ws = window_start(now, window_s)
    grant = Grant(window_start=ws, window_s=window_s)
    for need in needs:
        if need.amount > need.limit:
            raise Rejected(need.kind, need.limit, 0, window_s, too_large=True)
        used = conn.execute(statement(conn, "rate_take"), {"t": tenant_id, "k": need.kind, "ws": ws,
                                                           "n": need.amount, "lim": need.limit}).scalar()
        if used is None:
            current = conn.execute(select(RateCounter.used).where(
                RateCounter.tenant_id == tenant_id, RateCounter.kind == need.kind,
                RateCounter.window_start == ws)).scalar() or 0
            raise Rejected(need.kind, need.limit, int(current), ws + window_s - now)
        grant.used[need.kind] = (need.limit, int(used))
        grant.taken[need.kind] = need.amount
    if concurrency is not None:
        if conn.execute(statement(conn, "slot_take"), {"t": tenant_id, "lim": concurrency}).scalar() is None:
            raise Rejected("concurrency", concurrency, concurrency, 1.0)
        grant.lease_id = uuid.uuid4().hex
        conn.execute(statement(conn, "lease_add"), {"id": grant.lease_id, "tenant_id": tenant_id,
                                                    "expires_at": now + lease_ttl_s})
    return grant


def release(conn: Connection, tenant_id: int, grant: Grant, adjust: dict[str, int]) -> None:
    """Correct counted units (estimated tokens → actual, never below zero), then free the
    concurrency slot: only the DELETE that removes the lease decrements, so it happens once.
    Row locks are taken in the same order as `acquire` (counters, then in-flight): no deadlocks."""
    for kind, delta in adjust.items():
        if delta == 0:
            continue
        # Upsert: tokens counted only at settle (no estimate) still land in the window.
        conn.execute(statement(conn, "rate_adjust"), {"t": tenant_id, "k": kind, "ws": grant.window_start,
                                                      "first": max(0, delta), "d": delta})
    if grant.lease_id is not None:
        gone = conn.execute(statement(conn, "lease_drop"), {"id": grant.lease_id}).rowcount
        if gone == 1:
            conn.execute(statement(conn, "slot_release"), {"t": tenant_id})


def renew(conn: Connection, lease_ids: list[str], *, expires_at: float) -> None:
    """Push the expiry of running requests' leases (a released lease is simply not there)."""
    for i in range(0, len(lease_ids), 500):
        conn.execute(update(InFlightLease).where(InFlightLease.id.in_(lease_ids[i:i + 500]))
                     .values(expires_at=expires_at))


def sweep(conn: Connection, *, now: float, window_s: int) -> int:
    """Free slots whose lease expired (a replica died mid-request) and drop old windows."""
    conn.execute(delete(RateCounter).where(RateCounter.window_start < window_start(now, window_s) - window_s))
    rows = conn.execute(delete(InFlightLease).where(InFlightLease.expires_at < now)
                        .returning(InFlightLease.tenant_id)).scalars().all()
    for tenant_id, n in Counter(rows).items():
        conn.execute(update(InFlight).where(InFlight.tenant_id == tenant_id)
                     .values(count=case((InFlight.count - n < 0, 0), else_=InFlight.count - n)))
    return len(rows)
