"""`coalesce`: the first item goes out at once, the rest per interval; errors and cancels pass through."""

from __future__ import annotations

import asyncio

import pytest

from deployments.llm.coalesce import coalesce


async def _gen(items, gate: asyncio.Event | None = None, closed: list | None = None, fail: Exception | None = None):
    try:
        for i, x in enumerate(items):
            if i == 1 and gate is not None:
                await gate.wait()  # the rest only after the consumer saw the first list
            yield x
        if fail is not None:
            raise fail
    finally:
        if closed is not None:
            closed.append(True)


def test_first_item_is_not_held_for_the_interval():
    async def main():
        gate = asyncio.Event()
        out = coalesce(_gen([1, 2, 3, 4], gate), interval_s=60.0)
        # With a 60 s interval, an interval-ticking batcher would hold the first token for 60 s.
        first = await asyncio.wait_for(out.__anext__(), timeout=10)
        gate.set()
        rest = [b async for b in out]
        return first, rest

    first, rest = asyncio.run(main())
    assert first == [1]
    assert rest == [[2, 3, 4]]  # the end of the stream flushes at once, in one list


def test_stream_error_reaches_the_consumer_after_the_items():
    async def main():
        got = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for b in coalesce(_gen([1, 2], fail=RuntimeError("engine died")), interval_s=0.01):
                got.extend(b)
        return got

    assert asyncio.run(main()) == [1, 2]


def test_cancelling_the_consumer_closes_the_stream():
    async def main():
        closed: list = []
        gate = asyncio.Event()  # never set: the stream blocks after its first item
        out = coalesce(_gen([1, 2], gate, closed), interval_s=0.01)
        assert await out.__anext__() == [1]
        await out.aclose()
        await asyncio.sleep(0.05)
        return closed

    assert asyncio.run(main()) == [True]
