"""Coalesce a token stream into lists: the first item at once, then what arrived per interval.

One Serve stream message per token costs a round of (de)serialisation and an actor call per
token; RayLLM's `Batcher` coalesces per interval, but its first list also waits for the interval
tick, which adds up to `interval` to every request's time to first token. Here the first item is
sent the moment it exists (TTFT is what users feel), and only the rest is batched.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def coalesce(stream: AsyncIterator[T], interval_s: float | Callable[[], float]) -> AsyncIterator[list[T]]:
    """Lists of items from `stream`: `[first]` at once, then every `interval_s` what is queued.

    `interval_s` may be a callable, asked before each wait: 0 means "send each item as soon as it
    exists" (what an idle replica should do: inter-token latency stays the engine's), a positive
    value batches (what a replica with many open streams needs: one message per token per stream
    is where its, the ingress's and the proxy's CPU goes).
    The stream is read by a task of its own, so it keeps making progress while the consumer waits;
    cancelling this generator (a client disconnect) cancels that task, which closes `stream`.
    """
    interval = interval_s if callable(interval_s) else (lambda: interval_s)
    queue: asyncio.Queue[T] = asyncio.Queue()
    done = asyncio.Event()
    arrived = asyncio.Event()

    async def read() -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
                arrived.set()
        finally:
            done.set()
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        await arrived.wait()
        while True:
            arrived.clear()
            batch = _drain(queue)
            if batch:
                yield batch
            if done.is_set() and queue.empty():
                reader.result()  # re-raise the stream's error, if any
                return
            wait = interval()
            if wait <= 0:
                if queue.empty():
                    await arrived.wait()
                continue
            try:
                await asyncio.wait_for(done.wait(), timeout=wait)
            except TimeoutError:
                pass
    finally:
        if not reader.done():
            reader.cancel()


def _drain(queue: asyncio.Queue[T]) -> list[T]:
    items: list[T] = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
