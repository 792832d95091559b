"""`TaskProgress` (deployments/diffusion/progress.py) without a model: the engine's step callbacks
from another thread become a caller's step events, progress and last step; a caller that goes
away marks its task cancelled for the engine's next `should_cancel`."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.diffusion.progress import TaskProgress


async def test_steps_from_the_engine_thread_reach_the_streaming_caller() -> None:
    progress = TaskProgress("m")
    release = asyncio.Event()

    async def run() -> str:
        await release.wait()
        return "image"

    events: list = []
    stream = progress.stream_steps("t1", run())

    async def consume() -> None:
        async for e in stream:
            events.append(e)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)  # the generator registers its listener
    engine = threading.Thread(target=lambda: [progress.on_step("t1", s, 3) for s in (1, 2, 3)])
    engine.start()
    engine.join()
    for _ in range(500):  # the events cross threads via call_soon_threadsafe
        if len(events) == 3:
            break
        await asyncio.sleep(0.01)
    assert progress.get("t1") == (3, 3) and progress.last_step["t1"] == 3
    release.set()
    await consumer
    assert events == [{"step": 1, "total": 3}, {"step": 2, "total": 3}, {"step": 3, "total": 3}, "image"]
    assert progress.get("t1") is None  # forgotten once the stream ended; the last step is kept
    assert progress.last_step["t1"] == 3


async def test_a_caller_going_away_cancels_its_task() -> None:
    progress = TaskProgress("m")
    never = asyncio.Event()

    async def run() -> str:
        await never.wait()
        return "image"

    async def consume() -> None:
        async for _ in progress.stream_steps("t2", run()):
            pass

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    assert not progress.should_cancel("t2")
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert progress.should_cancel("t2")  # the engine drops it at its next step
    progress.left_batch("t2")
    assert not progress.should_cancel("t2")
