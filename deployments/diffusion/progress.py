"""Per-task progress, cancellation and step events of one diffusion replica.

The engine reports each denoising step from its thread (`on_step`, cheap bookkeeping only) and
asks between steps whether a task was cancelled (`should_cancel`); its preview thread hands over
partial images (`on_preview`). Callers read a task's progress, cancel it, or stream its steps and
previews (`stream_steps`) on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from deployments.diffusion.types import PartialImage
from telemetry import metrics

R = TypeVar("R")
RECENT_TASKS = 1024  # last steps kept for finished tasks (to show where a cancel stopped one)


class TaskProgress:
    def __init__(self, model: str) -> None:
        self.model = model
        self._progress: dict[str, tuple[int, int]] = {}
        self._cancelled: set[str] = set()
        # task_id -> (event loop, queue) of a streaming caller waiting for step events and previews.
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple[int, int] | PartialImage]]] = {}
        # Last denoising step each recent task reached (bounded), to show where a cancel stopped it.
        self.last_step: dict[str, int] = {}
        # (step, total) of the last step callback and when it came: step time = gap between steps.
        self._step_key: tuple[int, int] | None = None
        self._step_at = 0.0

    # -- the engine's side (its thread) -----------------------------------------------------

    def batch_started(self) -> None:
        self._step_key = None  # the first step of a batch has no step before it to time

    def on_step(self, task_id: str | None, step: int, total: int) -> None:
        # The engine calls this once per task of the running group after each step; the first
        # call of step s+1 ends step s+1, which began at the first call of step s.
        if (step, total) != self._step_key:
            now = time.perf_counter()
            if self._step_key == (step - 1, total):
                metrics.record_step(self.model, now - self._step_at)
            self._step_key, self._step_at = (step, total), now
        if task_id is None:
            return
        self._progress[task_id] = (step, total)
        self.last_step[task_id] = step
        if len(self.last_step) > RECENT_TASKS:
            self.last_step.pop(next(iter(self.last_step)))
        listener = self._listeners.get(task_id)
        if listener is not None:
            loop, queue = listener
            loop.call_soon_threadsafe(queue.put_nowait, (step, total))

    def on_preview(self, task_id: str, partial: PartialImage) -> None:
        """A preview of `task_id`'s image (from the preview thread): to its streaming caller, if any."""
        listener = self._listeners.get(task_id)
        if listener is not None:
            loop, queue = listener
            loop.call_soon_threadsafe(queue.put_nowait, partial)

    def should_cancel(self, task_id: str) -> bool:
        return task_id in self._cancelled

    # -- the callers' side (event loop) -----------------------------------------------------

    def get(self, task_id: str) -> tuple[int, int] | None:
        return self._progress.get(task_id)

    def cancel(self, task_id: str) -> None:
        self._cancelled.add(task_id)

    def left_batch(self, task_id: str) -> None:
        """The task left its batch: a cancellation mark is no longer needed."""
        self._cancelled.discard(task_id)

    def finished(self, task_id: str) -> None:
        self._progress.pop(task_id, None)

    async def stream_steps(self, task_id: str, run: Awaitable[R]
                           ) -> AsyncGenerator[dict[str, int] | PartialImage | R, None]:
        """Step events `{"step", "total"}` and `PartialImage`s of `task_id` while `run` (its
        generation) is awaited, then `run`'s result (after every event that arrived before it).
        Cancelling this generator (the caller went away) marks the task cancelled, so its batch
        group stops at the next step once no one in it still wants the image; the orphaned run's
        outcome is consumed and discarded."""
        queue: asyncio.Queue[tuple[int, int] | PartialImage] = asyncio.Queue()
        self._listeners[task_id] = (asyncio.get_running_loop(), queue)
        result = asyncio.ensure_future(run)
        try:
            while not result.done():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, result}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield _event(getter.result())
                else:
                    getter.cancel()
            while not queue.empty():  # what the run's thread handed over before it ended
                yield _event(queue.get_nowait())
            yield result.result()
        except asyncio.CancelledError:
            self.cancel(task_id)
            result.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        finally:
            self._listeners.pop(task_id, None)
            self._progress.pop(task_id, None)


def _event(item: tuple[int, int] | PartialImage) -> dict[str, int] | PartialImage:
    if isinstance(item, PartialImage):
        return item
    return {"step": item[0], "total": item[1]}
