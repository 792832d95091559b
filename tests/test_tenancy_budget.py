"""Budgets: atomic hold-then-settle; concurrent requests at the edge never overspend."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from servers import db_url, make_tenancy, postgres_server  # noqa: F401  (fixtures)
from sqlalchemy import select

from serve_app.errors import APIError
from serve_app.tenancy.models import BudgetHold, BudgetPeriod

PLAN = [{"name": "capped", "requests_per_minute": None, "tokens_per_minute": None, "images_per_minute": None,
         "max_concurrent_requests": None, "monthly_budget_usd": 1.0}]
PRICES = {"per_1k_prompt_tokens": 0.5, "per_1k_completion_tokens": 1.0, "per_image": 0.03, "per_gpu_second": 0.0}


def _budget(tenancy) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    with tenancy.engine.connect() as conn:
        spent, reserved = conn.execute(select(BudgetPeriod.spent_micros, BudgetPeriod.reserved_micros)).one()
        holds = len(conn.execute(select(BudgetHold.id)).all())
    return int(spent), int(reserved), holds


def test_50_concurrent_requests_never_overspend(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    tenancy = make_tenancy(db_url, tmp_path, plans=PLAN, prices=PRICES, pool_size=8)
    tenancy.create_tenant("acme")
    ctx = tenancy.authenticate_sync(tenancy.create_key("acme").key)
    # $0.40 already spent: $0.60 left holds exactly 20 requests of one $0.03 image.
    first = tenancy.admit_sync(ctx, route="chat", model="m", est_tokens=800)
    first.add(prompt_tokens=800)  # 800 × $0.5/1k
    first.settle_sync()
    admitted, refused, lock = [], [], threading.Lock()
    barrier = threading.Barrier(50)

    def request() -> None:
        barrier.wait()
        try:
            adm = tenancy.admit_sync(ctx, route="images", model="m", images=1)
        except APIError as e:
            with lock:
                refused.append(e)
            return
        with lock:
            admitted.append(adm)

    threads = [threading.Thread(target=request) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 20 and len(refused) == 30
    assert {(e.status, e.type, e.code) for e in refused} == {(429, "insufficient_quota", "insufficient_quota")}
    spent, reserved, holds = _budget(tenancy)
    assert (spent, reserved, holds) == (400_000, 600_000, 20)

    def settle(adm) -> None:  # type: ignore[no-untyped-def]
        adm.add(images=1)
        adm.settle_sync()

    settlers = [threading.Thread(target=settle, args=(a,)) for a in admitted]
    for t in settlers:
        t.start()
    for t in settlers:
        t.join()
    assert _budget(tenancy) == (1_000_000, 0, 0)  # exactly the budget, never above
    with pytest.raises(APIError) as err:
        tenancy.admit_sync(ctx, route="chat", model="m")  # nothing left, even for a free-looking request
    assert err.value.code == "insufficient_quota" and "$1.00" in err.value.message
    tenancy.close()


def test_settle_charges_actual_once_and_releases_the_hold(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    tenancy = make_tenancy(db_url, tmp_path, plans=PLAN, prices=PRICES)
    tenancy.create_tenant("acme")
    ctx = tenancy.authenticate_sync(tenancy.create_key("acme").key)
    adm = tenancy.admit_sync(ctx, route="chat", model="m", est_tokens=300)  # holds 300 × $1/1k = $0.30
    assert _budget(tenancy) == (0, 300_000, 1)
    adm.add(prompt_tokens=100, completion_tokens=50)  # $0.05 + $0.05
    assert adm.settle_sync() is True
    assert adm.settle_sync() is False
    assert _budget(tenancy) == (100_000, 0, 0)
    report = tenancy.usage("acme")
    assert (report.totals.requests, report.totals.cost_usd) == (1, 0.1)
    tenancy.sweep(now=10**10)  # a sweep after settle finds nothing to release
    assert _budget(tenancy) == (100_000, 0, 0)
    tenancy.close()
