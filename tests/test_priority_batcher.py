"""LazyBatcher's priority order with aging (no Ray): a high plan jumps a saturating low-plan
queue; a low item still runs within a bounded wait."""

from __future__ import annotations

import asyncio

import pytest

from deployments.diffusion.batcher import LazyBatcher


def _batcher(batches: list[list[tuple[str, int]]], *, run_s: float, aging_s: float, size: int = 2):
    async def run(items: list[tuple[str, int]]) -> list[str]:
        batches.append(list(items))
        await asyncio.sleep(run_s)
        return [name for name, _ in items]

    return LazyBatcher(run, max_batch_size=size, wait_s=0.0, priority_of=lambda it: it[1], aging_s=aging_s)


async def test_high_priority_served_in_next_batch() -> None:
    batches: list[list[tuple[str, int]]] = []
    b = _batcher(batches, run_s=0.05, aging_s=100.0)
    low = [asyncio.ensure_future(b.submit((f"low{i}", 0))) for i in range(10)]
    await asyncio.sleep(0.01)  # first low batch is running; 8 low items wait
    high = asyncio.ensure_future(b.submit(("high", 2)))
    assert await high == "high"
    assert [n for n, _ in batches[1]][0] == "high"  # the batch right after the running one
    await asyncio.gather(*low)


async def test_fifo_within_equal_priority() -> None:
    batches: list[list[tuple[str, int]]] = []
    b = _batcher(batches, run_s=0.01, aging_s=10.0, size=3)
    await asyncio.gather(*(b.submit((str(i), 1)) for i in range(9)))
    assert [n for batch in batches for n, _ in batch] == [str(i) for i in range(9)]


async def test_low_priority_not_starved_by_high_burst() -> None:
    """A continuous high-priority (+1) load: aging_s=0.2 lets the low item outrank newcomers after
    ~0.2 s, so it runs within a few batches instead of after the whole burst."""
    batches: list[list[tuple[str, int]]] = []
    b = _batcher(batches, run_s=0.05, aging_s=0.2)
    stop = False

    async def flood() -> None:
        while not stop:
            await asyncio.gather(*(b.submit(("high", 1)) for _ in range(4)))

    floods = [asyncio.ensure_future(flood()) for _ in range(3)]
    await asyncio.sleep(0.02)
    ran_before = len(batches)
    await asyncio.wait_for(b.submit(("low", 0)), timeout=10.0)
    stop = True
    await asyncio.gather(*floods)
    low_batch = next(i for i, batch in enumerate(batches) if ("low", 0) in batch)
    # Counted in batches, not seconds (robust on a loaded machine): ahead of "low" run the backlog
    # at its arrival (12 highs, 6 batches of 2) and the highs arriving while it ages past them
    # (aging_s / run_s = 4 batches at most, since every batch takes >= run_s). Without aging it
    # never runs while the flood lasts (next test).
    assert low_batch - ran_before <= 6 + 4 + 1, (low_batch, ran_before)


async def test_without_aging_low_would_wait_for_the_burst() -> None:
    """Control for the test above: with very slow aging the low item waits out the whole flood."""
    batches: list[list[tuple[str, int]]] = []
    b = _batcher(batches, run_s=0.02, aging_s=1000.0)
    highs = [asyncio.ensure_future(b.submit(("high", 1))) for _ in range(20)]
    await asyncio.sleep(0)
    low = asyncio.ensure_future(b.submit(("low", 0)))
    await asyncio.sleep(0)
    highs += [asyncio.ensure_future(b.submit(("high", 1))) for _ in range(10)]
    await asyncio.gather(low, *highs)
    order = [n for batch in batches for n, _ in batch]
    assert order.index("low") == len(order) - 1


def test_aging_must_be_positive() -> None:
    with pytest.raises(ValueError, match="aging_s must be > 0, got 0"):
        LazyBatcher(lambda items: None, max_batch_size=1, wait_s=0.0, aging_s=0)  # type: ignore[arg-type]
