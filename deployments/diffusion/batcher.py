"""Batches formed when the GPU frees up, not while it is busy.

Ray Serve 2.60's `@serve.batch` forms the next batch eagerly: its loop cuts a batch from whatever
arrived within `batch_wait_timeout_s` and parks it until the running batch ends, then starts on
the next one. Under load that freezes batches at partial sizes while the GPU is busy — measured on
an H200 (SDXL 512², 4 steps, max 8): mean batch 6.2 of 8 with a deep queue, 0.68x of the raw
pipeline's images/s. Here a single worker takes what is queued at the moment it is free (up to
`max_batch_size`), waiting up to `wait_s` for more only when fewer are queued — so a lone request
still starts after at most `wait_s`, and a busy replica runs full batches.

Which queued items form the batch: highest effective priority first, where effective priority =
`priority_of(item) + waited_s / aging_s` (ties: arrival order). A higher plan jumps the queue,
and aging bounds a low plan's wait: an item that waited `aging_s · Δpriority` outranks every
newcomer Δpriority above it (docs/priority-and-quality.md).

How many: up to `max_batch_size` items and, with `cost_of`, up to `max_batch_cost` (the replica's
memory budget in megapixels): a batch is closed before an item would push it over, and that item
waits for the next one (a batch always takes at least one item; the ingress refuses larger ones).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class LazyBatcher(Generic[T, R]):
    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], *, max_batch_size: int, wait_s: float,
                 priority_of: Callable[[T], int] | None = None, aging_s: float = 10.0,
                 cost_of: Callable[[T], float] | None = None, max_batch_cost: float | None = None) -> None:
        if aging_s <= 0:
            raise ValueError(f"aging_s must be > 0, got {aging_s}")
        self._run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.priority_of = priority_of
        self.aging_s = aging_s
        self.cost_of = cost_of
        self.max_batch_cost = max_batch_cost
        # (item, future, rank) where rank sorts ascending = served first (see _rank).
        self._queue: list[tuple[T, asyncio.Future, tuple[float, int]]] = []
        self._seq = itertools.count()
        self.running = 0  # items in the batch being run now
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.batches = 0

    def set_max_batch_size(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {n}")
        self.max_batch_size = n

    def set_batch_wait_timeout_s(self, s: float) -> None:
        if s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {s}")
        self.wait_s = s

    def set_max_batch_cost(self, cost: float | None) -> None:
        if cost is not None and cost <= 0:
            raise ValueError(f"max_batch_cost must be > 0, got {cost}")
        self.max_batch_cost = cost

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, item: T) -> R:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut, self._rank(item)))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())
        return await fut  # cancelling the caller cancels its future: it is skipped below

    def _rank(self, item: T) -> tuple[float, int]:
        # -(priority + (now - enqueued)/aging) orders like enqueued/aging - priority: `now` is
        # common to all items at selection time, so the key is fixed at arrival.
        prio = self.priority_of(item) if self.priority_of is not None else 0
        return (time.monotonic() / self.aging_s - prio, next(self._seq))

    def _live(self) -> int:
        return sum(not f.done() for _, f, _ in self._queue)

    def _cost(self, item: T) -> float:
        return self.cost_of(item) if self.cost_of is not None else 0.0

    def _full(self) -> bool:
        """Enough is queued for a whole batch (by count, or by cost where a budget is set)."""
        live = [item for item, f, _ in self._queue if not f.done()]
        if len(live) >= self.max_batch_size:
            return True
        return self.max_batch_cost is not None and sum(map(self._cost, live)) >= self.max_batch_cost

    def _take(self) -> list[tuple[T, asyncio.Future]]:
        """The best live items that fit one batch, removed from the queue (rank order: an item that
        does not fit closes the batch, so nothing behind it overtakes it)."""
        live = sorted((e for e in self._queue if not e[1].done()), key=lambda e: e[2])
        n, cost = 0, 0.0
        for item, _, _ in live[:self.max_batch_size]:
            c = self._cost(item)
            if n and self.max_batch_cost is not None and cost + c > self.max_batch_cost:
                break
            n, cost = n + 1, cost + c
        self._queue = live[n:]
        return [(item, fut) for item, fut, _ in live[:n]]

    async def _fill(self) -> None:
        """Wait (at most wait_s) until a full batch is queued."""
        deadline = time.monotonic() + self.wait_s
        while not self._full():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    async def _work(self) -> None:
        while True:
            while not self._live():
                self._queue.clear()
                self._arrived.clear()
                await self._arrived.wait()
            if not self._full() and self.wait_s > 0:
                await self._fill()
            batch = self._take()
            if not batch:
                continue
            self.batches += 1
            self.running = len(batch)
            try:
                results = await self._run([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
            except Exception as e:  # noqa: BLE001 - every caller of the batch gets the failure
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            finally:
                self.running = 0
            for (_, fut), res in zip(batch, results, strict=False):
                if not fut.done():
                    fut.set_result(res)


__all__ = ["LazyBatcher"]
