"""The overlap guard: who may start LLM work while admission decides (serve_app/tenancy/overlap.py)."""

from __future__ import annotations

import time

from serve_app.tenancy.overlap import OverlapGuard


def test_a_refusal_stops_overlap_for_that_tenant_until_the_cooldown_ends() -> None:
    guard = OverlapGuard(cooldown_s=0.2)
    assert guard.enter(1)
    guard.leave(1, refused=True)
    assert not guard.enter(1)  # refused here recently: sequential admission
    assert guard.enter(2)  # other tenants are not affected
    guard.leave(2, refused=False)
    time.sleep(0.25)
    assert guard.enter(1)
    guard.leave(1, refused=False)
    assert guard.enter(1)


def test_at_most_max_in_flight_overlaps_per_tenant() -> None:
    guard = OverlapGuard(cooldown_s=60, max_in_flight=2)
    assert guard.enter(7) and guard.enter(7)
    assert not guard.enter(7)
    guard.leave(7, refused=False)
    assert guard.enter(7)
