"""The diffusion replica's batcher: batches form when the worker is free."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.diffusion.batcher import LazyBatcher


async def test_busy_worker_gets_full_batches_lone_request_waits_at_most_wait_s() -> None:
    seen: list[int] = []

    async def run(items: list[int]) -> list[int]:
        seen.append(len(items))
        await asyncio.sleep(0.05)  # the "GPU" is busy while more requests arrive
        return [i * 10 for i in items]

    b = LazyBatcher(run, max_batch_size=4, wait_s=0.02)
    t0 = time.monotonic()
    assert await b.submit(1) == 10
    assert time.monotonic() - t0 < 0.5 and seen == [1]  # alone: waited ~wait_s, ran a batch of 1

    async def trickle() -> list[int]:
        tasks = []
        for i in range(12):  # arrive one by one while batches run
            tasks.append(asyncio.ensure_future(b.submit(i)))
            await asyncio.sleep(0.005)
        return list(await asyncio.gather(*tasks))

    assert await trickle() == [i * 10 for i in range(12)]
    # After the first (partial) batch, requests that queued during a run leave as full batches.
    assert seen[1:] and max(seen[1:]) == 4 and sum(seen[1:]) == 12
    assert seen.count(4) >= 2


async def test_cancelled_callers_are_skipped_and_failures_reach_every_caller() -> None:
    calls: list[list[str]] = []
    gate = asyncio.Event()

    async def run(items: list[str]) -> list[str]:
        calls.append(items)
        await gate.wait()
        if "boom" in items:
            raise ValueError("bad batch")
        return items

    b = LazyBatcher(run, max_batch_size=8, wait_s=0.0)
    first = asyncio.ensure_future(b.submit("a"))
    await asyncio.sleep(0.01)  # "a" is running; the next ones queue
    gone = asyncio.ensure_future(b.submit("cancelled"))
    boom = asyncio.ensure_future(b.submit("boom"))
    other = asyncio.ensure_future(b.submit("x"))
    await asyncio.sleep(0.01)
    gone.cancel()
    gate.set()
    assert await first == "a"
    for f in (boom, other):
        with pytest.raises(ValueError, match="bad batch"):
            await f
    assert calls == [["a"], ["boom", "x"]]


def test_reconfigure_validates() -> None:
    async def run(items):  # pragma: no cover - never called
        return items

    b = LazyBatcher(run, max_batch_size=2, wait_s=0.1)
    b.set_max_batch_size(16)
    b.set_batch_wait_timeout_s(0.0)
    assert (b.max_batch_size, b.wait_s) == (16, 0.0)
    with pytest.raises(ValueError, match="got 0"):
        b.set_max_batch_size(0)


async def test_cost_budget_closes_batches_in_rank_order() -> None:
    """Items cost their megapixels: a batch never exceeds the budget, a lone item larger than the
    rest still runs alone, and an item that does not fit is first in the next batch."""
    seen: list[list[float]] = []
    gate = asyncio.Event()

    async def run(items: list[float]) -> list[float]:
        seen.append(list(items))
        await gate.wait()
        return items

    b = LazyBatcher(run, max_batch_size=8, wait_s=0.0, cost_of=lambda mp: mp, max_batch_cost=1.0)
    first = asyncio.ensure_future(b.submit(0.1))  # occupies the worker while the rest queue up
    await asyncio.sleep(0.01)
    rest = [asyncio.ensure_future(b.submit(mp)) for mp in (0.5, 0.4, 0.3, 0.2, 1.0, 0.25)]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(first, *rest)
    assert seen[0] == [0.1]
    assert seen[1:] == [[0.5, 0.4], [0.3, 0.2], [1.0], [0.25]]
    assert all(sum(batch) <= 1.0 for batch in seen)


async def test_cost_budget_counts_as_full_batch_for_the_wait() -> None:
    """A queue that fills the budget is a full batch: the worker does not wait `wait_s` for more."""
    async def run(items: list[float]) -> list[float]:
        return items

    b = LazyBatcher(run, max_batch_size=8, wait_s=30.0, cost_of=lambda mp: mp, max_batch_cost=1.0)
    # Two items of 0.5 fill the budget: with wait_s=30 this only returns in time if they run at once.
    assert await asyncio.wait_for(asyncio.gather(b.submit(0.5), b.submit(0.5)), timeout=10) == [0.5, 0.5]
    with pytest.raises(ValueError):
        b.set_max_batch_cost(0)
