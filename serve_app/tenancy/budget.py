"""Monthly budgets: hold an upper-bound cost before the work, settle the actual cost after.

The hold is one conditional upsert, `reserved += :amt WHERE spent + reserved + :amt <= :budget`,
so 50 concurrent requests at the edge of a budget cannot together pass it. Settling deletes the
hold row first; only the statement that deleted it (rowcount 1) releases the held amount, which
makes a double settle (or a settle racing the stale-hold sweeper) harmless.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import Connection, delete, select, update

from serve_app.tenancy.models import BudgetHold, BudgetPeriod
from serve_app.tenancy.statements import statement


class OverBudget(Exception):
    def __init__(self, budget_micros: int, spent_micros: int, reserved_micros: int) -> None:
        super().__init__("over budget")
        self.budget_micros, self.spent_micros, self.reserved_micros = budget_micros, spent_micros, reserved_micros


def period_of(now: float) -> str:
    return datetime.fromtimestamp(now, tz=UTC).strftime("%Y-%m")


def reserve(conn: Connection, tenant_id: int, amount_micros: int, budget_micros: int, *,
            now: float, ttl_s: int) -> str:
    """Hold `amount_micros` (at least 1, so a spent-out tenant is refused) or raise OverBudget."""
    period = period_of(now)
    amount = max(1, amount_micros)
    if amount <= budget_micros:
        held = conn.execute(statement(conn, "budget_hold"), {"t": tenant_id, "p": period, "amt": amount,
                                                             "budget": budget_micros}).scalar()
        if held is not None:
            hold_id = uuid.uuid4().hex
            conn.execute(statement(conn, "hold_add"), {"id": hold_id, "tenant_id": tenant_id, "period": period,
                                                       "amount_micros": amount, "expires_at": now + ttl_s})
            return hold_id
    row = conn.execute(select(BudgetPeriod.spent_micros, BudgetPeriod.reserved_micros).where(
        BudgetPeriod.tenant_id == tenant_id, BudgetPeriod.period == period)).first()
    raise OverBudget(budget_micros, *(row or (0, 0)))


def settle(conn: Connection, tenant_id: int, hold_id: str | None, cost_micros: int, *, now: float) -> None:
    """Release the hold (if still there) and add the actual cost to the month it was held in."""
    period, held = period_of(now), 0
    if hold_id is not None:
        row = conn.execute(statement(conn, "hold_drop"), {"id": hold_id}).first()
        if row is not None:
            period, held = row[0], int(row[1])
    conn.execute(statement(conn, "budget_settle"), {"t": tenant_id, "p": period, "cost": cost_micros, "held": held})


def renew(conn: Connection, hold_ids: list[str], *, expires_at: float) -> None:
    """Push the expiry of running requests' holds (a settled hold is simply not there)."""
    for i in range(0, len(hold_ids), 500):
        conn.execute(update(BudgetHold).where(BudgetHold.id.in_(hold_ids[i:i + 500])).values(expires_at=expires_at))


def sweep(conn: Connection, *, now: float) -> int:
    """Release holds whose request stopped renewing them (its replica died) and never settled."""
    rows = conn.execute(delete(BudgetHold).where(BudgetHold.expires_at < now)
                        .returning(BudgetHold.tenant_id, BudgetHold.period, BudgetHold.amount_micros)).all()
    for tenant_id, period, amount in rows:
        conn.execute(update(BudgetPeriod).where(BudgetPeriod.tenant_id == tenant_id, BudgetPeriod.period == period)
                     .values(reserved_micros=BudgetPeriod.reserved_micros - amount))
    return len(rows)
