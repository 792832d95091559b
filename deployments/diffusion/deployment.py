"""The Serve deployment around `DiffusionEngine`: batching, GPU fraction, PNG off the hot path.

One deployment per configured model (the graph builder names them `Diffusion-<model>`).
Requests are single images (`ImageTask`); `@serve.batch` gathers them from all callers into one
denoising call. The batch handler returns raw images and is free for the next batch at once:
PNG encoding runs in a thread pool on each caller's own coroutine, overlapping the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from deployments.diffusion.types import ImageResult, ImageTask

logger = logging.getLogger("genserve.diffusion")


@dataclass
class _Denoised:
    image: Any  # PIL.Image, or the exception that failed this image's group
    batch_size: int
    compute_s: float
    queue_wait_s: float


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _set_cpu_threads(device: str) -> None:
    """On CPU, use as many torch threads as the replica was given CPUs (oversubscribed intra-op
    threads made tiny models several times slower on a shared 2-core host)."""
    if device != "cpu":
        return
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


def _cap_gpu_memory(device: str) -> float | None:
    """Hold a fractional-GPU replica to its share of the card (Ray only divides scheduling)."""
    if device != "cuda":
        return None
    import ray
    import torch

    share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0))
    if 0 < share < 1:
        torch.cuda.set_per_process_memory_fraction(share)
    return share


class DiffusionServer:
    """Plain logic (testable without Serve); `Diffusion` below is the thin deployment."""

    def __init__(self, *, name: str, family: str, model: str, dtype: str = "float32", device: str = "auto",
                 variant: str | None = None, batch_invariant: bool | None = None, decoder_steps: int = 12,
                 optimize: dict | None = None, engine: Any = None) -> None:
        from deployments.diffusion.engine import DiffusionEngine

        self.name = name
        self.device = _resolve_device(device)
        self.gpu_share = _cap_gpu_memory(self.device)
        _set_cpu_threads(self.device)
        t0 = time.monotonic()
        self.engine = engine or DiffusionEngine.from_pretrained(
            name, model, family, dtype=dtype, device=self.device, variant=variant, batch_invariant=batch_invariant,
            decoder_steps=decoder_steps, optimize=optimize)
        self.load_s = time.monotonic() - t0
        self._png_pool = ThreadPoolExecutor(max_workers=max(2, (os.cpu_count() or 2) // 2),
                                            thread_name_prefix="png")
        self._progress: dict[str, tuple[int, int]] = {}
        self._cancelled: set[str] = set()
        # task_id -> (event loop, queue) of a streaming caller waiting for step events.
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.batches_run = 0
        self.images_done = 0
        self.images_cancelled = 0
        # Last denoising step each recent task reached (bounded), to show where a cancel stopped it.
        self.last_step: dict[str, int] = {}
        logger.info("model %s (%s) loaded on %s in %.1fs", name, model, self.device, self.load_s)

    # Called in the engine's thread: cheap bookkeeping only.
    def _on_step(self, task_id: str | None, step: int, total: int) -> None:
        if task_id is None:
            return
        self._progress[task_id] = (step, total)
        self.last_step[task_id] = step
        if len(self.last_step) > 1024:
            self.last_step.pop(next(iter(self.last_step)))
        listener = self._listeners.get(task_id)
        if listener is not None:
            loop, queue = listener
            loop.call_soon_threadsafe(queue.put_nowait, (step, total))

    def listen(self, task_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners[task_id] = (asyncio.get_running_loop(), queue)
        return queue

    def forget(self, task_id: str) -> None:
        self._listeners.pop(task_id, None)
        self._progress.pop(task_id, None)

    def done(self, task_id: str) -> None:
        """The task left its batch: a cancellation mark is no longer needed."""
        self._cancelled.discard(task_id)

    def _should_cancel(self, task_id: str) -> bool:
        return task_id in self._cancelled

    def denoise(self, items: list[tuple[ImageTask, float]]) -> list[_Denoised]:
        started = time.monotonic()
        tasks = [t for t, _ in items]
        images = self.engine.generate_images(tasks, on_step=self._on_step, should_cancel=self._should_cancel)
        compute_s = time.monotonic() - started
        self.batches_run += 1
        return [_Denoised(img, len(tasks), compute_s, max(0.0, started - enq)) for img, (_, enq) in
                zip(images, items, strict=True)]

    async def finish(self, task: ImageTask, d: _Denoised) -> ImageResult:
        from deployments.diffusion.engine import GenerationCancelled, encode_png

        if isinstance(d.image, BaseException):
            if isinstance(d.image, GenerationCancelled):
                self.images_cancelled += 1
            raise d.image
        params = {
            "prompt": task.prompt, "negative_prompt": task.negative_prompt, "seed": task.seed,
            "steps": task.steps, "guidance_scale": task.guidance_scale, "model": self.name,
            "width": task.width, "height": task.height,
        }
        png = await asyncio.get_running_loop().run_in_executor(self._png_pool, encode_png, d.image, params)
        self.images_done += 1
        if task.task_id is not None:
            self._progress.pop(task.task_id, None)
        return ImageResult(png=png, seed=task.seed, width=task.width, height=task.height, steps=task.steps,
                           guidance_scale=task.guidance_scale, model=self.name, batch_size=d.batch_size,
                           compute_s=d.compute_s, queue_wait_s=d.queue_wait_s)

    def progress(self, task_id: str) -> tuple[int, int] | None:
        return self._progress.get(task_id)

    def cancel(self, task_id: str) -> None:
        self._cancelled.add(task_id)

    def stats(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"model": self.name, "device": self.device, "gpu_share": self.gpu_share,
                "assigned_resources": ctx.get_assigned_resources(),
                "gpu_ids": ctx.get_accelerator_ids().get("GPU", []),
                "batches_run": self.batches_run, "images_done": self.images_done,
                "images_cancelled": self.images_cancelled, "load_s": self.load_s}


@serve.deployment(
    name="Diffusion",
    # Serve's default of 5 caps every batch at 5; leave room for a full batch running plus the next
    # one gathering. The Serve config overrides this per model (see configs/serve.yaml).
    max_ongoing_requests=32,
    max_queued_requests=256,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
class Diffusion:
    def __init__(self, *, name: str, family: str, model: str, dtype: str = "float32", device: str = "auto",
                 variant: str | None = None, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.05,
                 batch_invariant: bool | None = None, decoder_steps: int = 12, optimize: dict | None = None) -> None:
        self.server = DiffusionServer(name=name, family=family, model=model, dtype=dtype, device=device,
                                      variant=variant, batch_invariant=batch_invariant, decoder_steps=decoder_steps,
                                      optimize=optimize)
        self._set_batching(max_batch_size, batch_wait_timeout_s)

    def _set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self._batch.set_max_batch_size(int(max_batch_size))
        self._batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)

    def reconfigure(self, user_config: dict) -> None:
        """`user_config: {max_batch_size, batch_wait_timeout_s}` changes batching without a restart."""
        self._set_batching(user_config.get("max_batch_size", self.max_batch_size),
                           user_config.get("batch_wait_timeout_s", self.batch_wait_timeout_s))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batch(self, items: list[tuple[ImageTask, float]]) -> list[_Denoised]:
        return await asyncio.to_thread(self.server.denoise, items)

    async def generate(self, task: ImageTask) -> ImageResult:
        try:
            denoised = await self._batch((task, time.monotonic()))
        finally:
            if task.task_id is not None:
                self.server.done(task.task_id)
        return await self.server.finish(task, denoised)

    async def generate_stream(self, task: ImageTask) -> AsyncIterator[dict | ImageResult]:
        """Step events `{"step", "total"}` while the image denoises, then the `ImageResult`.

        Called with `handle.options(stream=True)`. If the caller goes away (a cancelled job, a
        dead ingress), Serve cancels this generator: the task is marked cancelled and its batch
        group stops at the next step once no one in it still wants the image."""
        if task.task_id is None:
            raise ValueError("generate_stream needs task.task_id")
        queue = self.server.listen(task.task_id)
        result = asyncio.ensure_future(self.generate(task))
        try:
            while not result.done():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, result}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    step, total = getter.result()
                    yield {"step": step, "total": total}
                else:
                    getter.cancel()
            yield result.result()
        except asyncio.CancelledError:
            # The batch may already hold this task: mark it so the engine drops it at the next
            # step; the orphaned call's outcome is consumed here and discarded.
            self.server.cancel(task.task_id)
            result.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        finally:
            self.server.forget(task.task_id)

    async def progress(self, task_id: str) -> tuple[int, int] | None:
        return self.server.progress(task_id)

    async def last_step(self, task_id: str) -> int | None:
        return self.server.last_step.get(task_id)

    async def cancel(self, task_id: str) -> None:
        self.server.cancel(task_id)

    async def stats(self) -> dict:
        return {**self.server.stats(), "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s}

    def check_health(self) -> None:
        self.server.engine.health()
