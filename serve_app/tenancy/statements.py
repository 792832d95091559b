"""The statements of admission and settle, built once per dialect with bind parameters.

Building a SQLAlchemy Core statement and computing its cache key costs 200–330 µs of Python per
execution on the 2-core CI machine; executing a prebuilt one costs ~20 µs. An admission runs up to
six of them and a settle up to seven, in the ingress's process, holding the GIL the event loop
needs to relay tokens. The SQL is the same as before: the conditional upserts that make the
limits exact (see limits_sql.py, budget.py) only take their numbers as parameters now.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, bindparam, case, delete, insert, update

from serve_app.tenancy.db import insert_for
from serve_app.tenancy.models import (
    BudgetHold,
    BudgetPeriod,
    InFlight,
    InFlightLease,
    RateCounter,
    UsageDaily,
    UsageEvent,
)

_USAGE = ("prompt_tokens", "completion_tokens", "images", "gpu_seconds", "cost_micros")


def _rate_take(ins: Any) -> Any:
    """+:n to a window's counter if it stays within :lim; RETURNING the new count (none: refused)."""
    stmt = ins(RateCounter).values(tenant_id=bindparam("t"), kind=bindparam("k"), window_start=bindparam("ws"),
                                   used=bindparam("n"))
    return stmt.on_conflict_do_update(
        index_elements=[RateCounter.tenant_id, RateCounter.kind, RateCounter.window_start],
        set_={"used": RateCounter.used + bindparam("n")},
        where=RateCounter.used + bindparam("n") <= bindparam("lim"),
    ).returning(RateCounter.used)


def _rate_adjust(ins: Any) -> Any:
    """Correct a window's counter by :d (estimate → actual), never below zero."""
    new = RateCounter.used + bindparam("d")
    stmt = ins(RateCounter).values(tenant_id=bindparam("t"), kind=bindparam("k"), window_start=bindparam("ws"),
                                   used=bindparam("first"))
    return stmt.on_conflict_do_update(
        index_elements=[RateCounter.tenant_id, RateCounter.kind, RateCounter.window_start],
        set_={"used": case((new < 0, 0), else_=new)})


def _slot_take(ins: Any) -> Any:
    stmt = ins(InFlight).values(tenant_id=bindparam("t"), count=1)
    return stmt.on_conflict_do_update(
        index_elements=[InFlight.tenant_id], set_={"count": InFlight.count + 1},
        where=InFlight.count + 1 <= bindparam("lim"),
    ).returning(InFlight.count)


def _budget_hold(ins: Any) -> Any:
    stmt = ins(BudgetPeriod).values(tenant_id=bindparam("t"), period=bindparam("p"), spent_micros=0,
                                    reserved_micros=bindparam("amt"))
    return stmt.on_conflict_do_update(
        index_elements=[BudgetPeriod.tenant_id, BudgetPeriod.period],
        set_={"reserved_micros": BudgetPeriod.reserved_micros + bindparam("amt")},
        where=BudgetPeriod.spent_micros + BudgetPeriod.reserved_micros + bindparam("amt") <= bindparam("budget"),
    ).returning(BudgetPeriod.reserved_micros)


def _budget_settle(ins: Any) -> Any:
    stmt = ins(BudgetPeriod).values(tenant_id=bindparam("t"), period=bindparam("p"), spent_micros=bindparam("cost"),
                                    reserved_micros=0)
    return stmt.on_conflict_do_update(
        index_elements=[BudgetPeriod.tenant_id, BudgetPeriod.period],
        set_={"spent_micros": BudgetPeriod.spent_micros + bindparam("cost"),
              "reserved_micros": BudgetPeriod.reserved_micros - bindparam("held")})


def _usage_daily(ins: Any) -> Any:
    """One more request and its usage on the tenant's day (params `u_<column>`: a bind parameter
    may not be named like a column of the table it inserts into)."""
    stmt = ins(UsageDaily).values(tenant_id=bindparam("t"), day=bindparam("u_day"), requests=1,
                                  **{k: bindparam(f"u_{k}") for k in _USAGE})
    return stmt.on_conflict_do_update(
        index_elements=[UsageDaily.tenant_id, UsageDaily.day],
        set_={"requests": UsageDaily.requests + 1, **{k: getattr(UsageDaily, k) + getattr(stmt.excluded, k)
                                                      for k in _USAGE}})


_BUILDERS: dict[str, Callable[[Any], Any]] = {
    "rate_take": _rate_take,
    "rate_adjust": _rate_adjust,
    "slot_take": _slot_take,
    "lease_add": lambda ins: insert(InFlightLease),
    "lease_drop": lambda ins: delete(InFlightLease).where(InFlightLease.id == bindparam("id")),
    "slot_release": lambda ins: update(InFlight).where(InFlight.tenant_id == bindparam("t"))
    .values(count=InFlight.count - 1),
    "budget_hold": _budget_hold,
    "hold_add": lambda ins: insert(BudgetHold),
    "hold_drop": lambda ins: delete(BudgetHold).where(BudgetHold.id == bindparam("id"))
    .returning(BudgetHold.period, BudgetHold.amount_micros),
    "budget_settle": _budget_settle,
    "usage_event": lambda ins: insert(UsageEvent),
    "usage_daily": _usage_daily,
}
_built: dict[tuple[str, str], Any] = {}


def statement(conn: Connection, name: str) -> Any:
    """The prebuilt statement `name` for this connection's dialect (sqlite or postgresql)."""
    key = (conn.dialect.name, name)
    stmt = _built.get(key)
    if stmt is None:
        stmt = _built[key] = _BUILDERS[name](insert_for(conn))
    return stmt
