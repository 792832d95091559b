"""Settle exactly once whatever the cancellation pattern (issue 17, finding 1).

Hundreds of admissions, plain (`async with adm`) and streamed (`MeteredStreamingResponse` driven
through a fake ASGI server), each cancelled at a random moment — while admission is decided, while
working, mid-stream, during settle — with `Task.cancel()` landing one to three times. Afterwards no
slot, lease or budget hold is left, every admitted request has exactly one ledger row, and the next
request is admitted. Leases: a running request's slot outlives lease_ttl_s (renewed); one whose
process stopped renewing is freed about lease_ttl_s later.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest
from servers import free_port, make_tenancy, postgres_server, redis_server, redis_url  # noqa: F401  (fixtures)
from sqlalchemy import func, select

from serve_app.errors import APIError
from serve_app.tenancy import MeteredStreamingResponse
from serve_app.tenancy.models import BudgetHold, BudgetPeriod, InFlight, InFlightLease, RateCounter, UsageEvent

PLAN = {"name": "two", "requests_per_minute": 1_000_000, "tokens_per_minute": None, "images_per_minute": None,
        "max_concurrent_requests": 2, "monthly_budget_usd": 1000.0}
ITERATIONS = int(os.environ.get("GENSERVE_CANCEL_ITERATIONS", "300"))


def _ledger(tenancy) -> dict:  # type: ignore[no-untyped-def]
    with tenancy.engine.connect() as conn:
        return {
            "in_flight": conn.execute(select(func.coalesce(func.sum(InFlight.count), 0))).scalar(),
            "leases": conn.execute(select(func.count()).select_from(InFlightLease)).scalar(),
            "holds": conn.execute(select(func.count()).select_from(BudgetHold)).scalar(),
            "reserved": conn.execute(select(func.coalesce(func.sum(BudgetPeriod.reserved_micros), 0))).scalar(),
            "admitted": conn.execute(select(func.coalesce(func.sum(RateCounter.used), 0))
                                     .where(RateCounter.kind == "requests")).scalar(),
            "events": dict(conn.execute(select(UsageEvent.status, func.count()).group_by(UsageEvent.status)).all()),
        }


async def _plain(tenancy, ctx, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
    adm = await tenancy.admit(ctx, route="chat", model="m", est_tokens=40)
    async with adm:
        adm.add(prompt_tokens=3)
        await asyncio.sleep(rng.random() * 0.004)
        adm.set_usage({"prompt_tokens": 3, "completion_tokens": 5})


async def _streamed(tenancy, ctx, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
    """The response the chat route returns, run the way an ASGI server runs it: both ASGI spec
    versions (2.4: no disconnect listener; older: a task group that listens for one)."""
    adm = await tenancy.admit(ctx, route="chat", model="m", est_tokens=40)
    adm.add(prompt_tokens=3)

    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(6):
            await asyncio.sleep(rng.random() * 0.0005)
            yield f"data: {i}\n\n"
            adm.add(completion_tokens=1)  # counted once the chunk was sent

    async def receive() -> dict:
        await asyncio.sleep(rng.random() * 0.02 if rng.random() < 0.3 else 3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await asyncio.sleep(rng.random() * 0.0005)

    scope = {"type": "http", "asgi": {"spec_version": rng.choice(["2.4", "2.1"])}}
    await MeteredStreamingResponse(chunks(), adm, media_type="text/event-stream")(scope, receive, send)


async def _cancelled_at_random(tenancy, ctx, rng: random.Random) -> str:  # type: ignore[no-untyped-def]
    task = asyncio.ensure_future((_plain if rng.random() < 0.5 else _streamed)(tenancy, ctx, rng))
    await asyncio.sleep(rng.choice([0, rng.random() * 0.002, rng.random() * 0.01]))
    for _ in range(rng.randint(1, 3)):  # Task.cancel() repeatedly: aclose, settle, a proxy's own cancel...
        task.cancel()
        await asyncio.sleep(rng.choice([0, 0, 0.0002, 0.001, 0.003]))
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    except APIError as e:  # 429 while a previous request's settle still runs in its thread
        assert e.status == 429, e
        return "refused"
    return "done"


async def _wait_quiet(tenancy, timeout_s: float = 20.0) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        busy = tenancy.pending  # admissions/settles still in worker threads (their tasks are gone)
        state = _ledger(tenancy)
        if not busy and (state["in_flight"], state["leases"], state["holds"], state["reserved"]) == (0, 0, 0, 0):
            return state
        if time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.005)


def test_settle_once_under_random_repeated_cancels(tmp_path: Path) -> None:
    tenancy = make_tenancy(f"sqlite:///{tmp_path / 'a.db'}", tmp_path, plans=[PLAN])
    tenancy.create_tenant("acme")
    ctx = tenancy.authenticate_sync(tenancy.create_key("acme").key)
    rng = random.Random(int(os.environ.get("GENSERVE_CANCEL_SEED", "17")))

    async def main() -> dict:
        await (await tenancy.admit(ctx, route="chat", model="m")).settle()  # warm-up (first metric imports Ray)
        outcomes: dict[str, int] = {}
        for _ in range(ITERATIONS // 2):  # two at a time: the plan's concurrency
            for o in await asyncio.gather(*(_cancelled_at_random(tenancy, ctx, rng) for _ in range(2))):
                outcomes[o] = outcomes.get(o, 0) + 1
            # A cancelled task does not wait for its settle; let it land before the next pair.
            if (await _wait_quiet(tenancy))["in_flight"]:
                break  # leaked: no point going on
        state = await _wait_quiet(tenancy)
        # The next request is admitted (both slots free).
        a = await tenancy.admit(ctx, route="chat", model="m")
        b = await tenancy.admit(ctx, route="chat", model="m")
        await a.settle()
        await b.settle()
        return {"outcomes": outcomes, **state}

    try:
        state = asyncio.run(main())
        print(state)
        assert (state["in_flight"], state["leases"], state["holds"], state["reserved"]) == (0, 0, 0, 0), state
        # Exactly once: one ledger row per admitted request (the requests window counts admissions).
        assert sum(state["events"].values()) == state["admitted"], state
        assert state["admitted"] >= ITERATIONS * 0.5 and state["outcomes"].get("refused", 0) < ITERATIONS * 0.1
        assert set(state["events"]) <= {"ok", "disconnected"}, state
        assert state["events"].get("disconnected", 0) >= state["outcomes"].get("cancelled", 0) // 2, state
    finally:
        tenancy.close()


def test_streamed_disconnect_is_recorded_disconnected(tmp_path: Path) -> None:
    """A stream cut before its end is `disconnected` in the ledger, a complete one `ok`, even
    though nothing (no `metered`) told the response how the stream went."""
    tenancy = make_tenancy(f"sqlite:///{tmp_path / 'a.db'}", tmp_path, plans=[PLAN])
    tenancy.create_tenant("acme")
    ctx = tenancy.authenticate_sync(tenancy.create_key("acme").key)

    async def run(cut_after: int | None) -> None:
        adm = await tenancy.admit(ctx, route="chat", model="m")
        sent = asyncio.Event()
        count = 0

        async def chunks():  # type: ignore[no-untyped-def]
            for i in range(5):
                yield f"data: {i}\n\n"

        async def send(message: dict) -> None:
            nonlocal count
            count += 1
            if cut_after is not None and count > cut_after:
                sent.set()
                await asyncio.sleep(3600)

        async def receive() -> dict:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(MeteredStreamingResponse(chunks(), adm)(
            {"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
        if cut_after is None:
            await task
        else:
            await sent.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await adm.settle()

    asyncio.run(run(2))
    asyncio.run(run(None))
    assert _ledger(tenancy)["events"] == {"disconnected": 1, "ok": 1}
    tenancy.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_lease_is_renewed_while_running_and_expires_once_renewal_stops(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    overrides: dict = {"lease_ttl_s": 2, "lease_renew_s": 0.4}
    if backend == "redis":
        overrides["redis_url"] = request.getfixturevalue("redis_url")
    url = f"sqlite:///{tmp_path / 'a.db'}"
    plan = {**PLAN, "max_concurrent_requests": 1}
    holder = make_tenancy(url, tmp_path, plans=[plan], **overrides)  # "replica A"
    other = make_tenancy(url, tmp_path, plans=[plan], **overrides)   # "replica B", same database
    holder.create_tenant("acme")
    key = holder.create_key("acme").key
    ctx_a, ctx_b = holder.authenticate_sync(key), other.authenticate_sync(key)
    held = holder.admit_sync(ctx_a, route="images", model="m", images=1)
    try:
        time.sleep(3.5)  # well past lease_ttl_s: A renews its lease, so B is still refused
        other.sweep()
        with pytest.raises(APIError) as e:
            other.admit_sync(ctx_b, route="chat", model="m")
        assert e.value.status == 429 and "concurrent" in str(e.value.body())
        holder.stop_renewing()  # A's process "died": it renews nothing any more
        stopped = time.monotonic()
        while True:
            try:
                other.admit_sync(ctx_b, route="chat", model="m").settle_sync()
                break
            except APIError:
                assert time.monotonic() - stopped < 2 + 1.5, "the abandoned slot was never freed"
                time.sleep(0.1)
        freed_after = time.monotonic() - stopped
        print(f"{backend}: slot freed {freed_after:.2f}s after renewal stopped (ttl 2s)")
        assert freed_after > 1.0  # not before the lease ran out
        deadline = time.monotonic() + 3  # Redis frees the slot itself; the SQL hold is swept (keeper)
        while (state := _ledger(other))["holds"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (state["holds"], state["reserved"]) == (0, 0)
        if backend == "sqlite":
            assert (state["in_flight"], state["leases"]) == (0, 0)
        held.settle_sync()  # A's late settle (if it ever comes) frees nothing twice
        other.admit_sync(ctx_b, route="chat", model="m").settle_sync()
        if backend == "sqlite":
            assert _ledger(other)["in_flight"] == 0
    finally:
        holder.close()
        other.close()


def test_settle_after_close_still_settles(tmp_path: Path) -> None:
    """A settle started after `close()` (process shutting down) runs inline rather than not at all."""
    tenancy = make_tenancy(f"sqlite:///{tmp_path / 'a.db'}", tmp_path, plans=[PLAN])
    tenancy.create_tenant("acme")
    ctx = tenancy.authenticate_sync(tenancy.create_key("acme").key)
    adm = tenancy.admit_sync(ctx, route="chat", model="m")
    tenancy._threads.shutdown(wait=True)  # what close() does first; the engine stays usable here
    assert asyncio.run(adm.settle("disconnected")) is True
    assert _ledger(tenancy)["in_flight"] == 0 and _ledger(tenancy)["events"] == {"disconnected": 1}
    tenancy.close()
