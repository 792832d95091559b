"""The Serve deployment around `DiffusionEngine`: batching, GPU fraction, PNG off the hot path.

One deployment per configured model (the graph builder names them `Diffusion-<model>`), bound
with that model's typed `DiffusionModelConfig` (deployments/diffusion/config.py).
Requests are single images (`ImageTask`); the replica's batcher gathers them from all callers into
one denoising call, formed when the GPU frees up (batcher.py says why not `@serve.batch`). The
batch returns raw images and the GPU is free for the next batch at once: PNG encoding runs in a
thread pool on each caller's own coroutine, overlapping the next batch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from deployments.diffusion.batcher import LazyBatcher
from deployments.diffusion.config import BatchingConfig, DiffusionModelConfig
from deployments.diffusion.quality import REASON_LOAD, AdaptiveQuality
from deployments.diffusion.types import ImageResult, ImageTask
from deployments.placement import place_replica
from telemetry import TelemetryConfig, metrics, setup_telemetry, tracing

logger = logging.getLogger("genserve.diffusion")

# zlib level 1: 3-5x faster than the default 6 for ~10-30 % larger files; encoding runs beside
# the next batch on the replica's CPUs, so cheaper encoding leaves more CPU for launching kernels.
PNG_COMPRESS_LEVEL = 1
DENOISE_ON_LOOP = os.environ.get("GENSERVE_DENOISE_ON_LOOP") == "1"


@dataclass
class _Denoised:
    image: Any  # PIL.Image, or the exception that failed this image's group
    batch_size: int
    compute_s: float
    queue_wait_s: float


def _set_cpu_threads(device: str) -> None:
    """On CPU, use as many torch threads as the replica was given CPUs (oversubscribed intra-op
    threads made tiny models several times slower on a shared 2-core host)."""
    if device != "cpu":
        return
    import ray
    import torch

    if ray._private.worker.global_worker.mode != ray.WORKER_MODE:
        return  # not a Ray actor (Serve's local testing mode): no CPU share to size threads by
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


class DiffusionServer:
    """Plain logic (testable without Serve); `Diffusion` below is the thin deployment."""

    def __init__(self, config: DiffusionModelConfig, *, engine: Any = None) -> None:
        from deployments.diffusion.engine import DiffusionEngine

        self.config = config
        self.name = name = config.name
        # The GPU Ray assigned (pinned, memory capped to the share) or cpu: deployments/placement.py.
        self.device, self.placement, self.gpu_share = place_replica(config.device)
        _set_cpu_threads(self.device)
        t0 = time.monotonic()
        self.engine = engine or DiffusionEngine.from_config(config, self.device)
        self.memory_probe: dict | None = None
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
        # (step, total) of the last step callback and when it came: step time = gap between steps.
        self._step_key: tuple[int, int] | None = None
        self._step_at = 0.0
        logger.info("model %s (%s) loaded on %s in %.1fs", name, config.model, self.device, self.load_s)

    # Called in the engine's thread: cheap bookkeeping only.
    def _on_step(self, task_id: str | None, step: int, total: int) -> None:
        # The engine calls this once per task of the running group after each step; the first
        # call of step s+1 ends step s+1, which began at the first call of step s.
        if (step, total) != self._step_key:
            now = time.perf_counter()
            if self._step_key == (step - 1, total):
                metrics.record_step(self.name, now - self._step_at)
            self._step_key, self._step_at = (step, total), now
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
        self._step_key = None
        images = self.engine.generate_images(tasks, on_step=self._on_step, should_cancel=self._should_cancel)
        compute_s = time.monotonic() - started
        self.batches_run += 1
        groups: dict[tuple, int] = {}
        for t in tasks:  # the engine runs one pipeline call per group key
            groups[t.group_key()] = groups.get(t.group_key(), 0) + 1
        metrics.record_batch(self.name, groups.values(), [max(0.0, started - enq) for _, enq in items])
        return [_Denoised(img, len(tasks), compute_s, max(0.0, started - enq)) for img, (_, enq) in
                zip(images, items, strict=True)]

    async def finish(self, task: ImageTask, d: _Denoised) -> ImageResult:
        from deployments.diffusion.engine import GenerationCancelled
        from deployments.diffusion.png import encode_png, png_params

        if isinstance(d.image, BaseException):
            if isinstance(d.image, GenerationCancelled):
                self.images_cancelled += 1
            raise d.image
        params = png_params(task, self.name)
        png = await asyncio.get_running_loop().run_in_executor(
            self._png_pool, functools.partial(encode_png, compress_level=PNG_COMPRESS_LEVEL), d.image, params)
        self.images_done += 1
        if task.task_id is not None:
            self._progress.pop(task.task_id, None)
        return ImageResult(png=png, seed=task.seed, width=task.width, height=task.height, steps=task.steps,
                           guidance_scale=task.guidance_scale, model=self.name, batch_size=d.batch_size,
                           compute_s=d.compute_s, queue_wait_s=d.queue_wait_s)

    def probe_memory(self, *, max_batch_size: int, max_batch_megapixels: float) -> None:
        """On CUDA: run the worst-case batches once (deployments/diffusion/memory.py)."""
        if self.device != "cuda":
            return
        from deployments.diffusion import memory

        c = self.config
        shapes = memory.worst_case_shapes(native_side=c.native_resolution, max_side=c.max_side,
                                          size_multiple=c.size_multiple, max_batch_size=max_batch_size,
                                          max_batch_megapixels=max_batch_megapixels)
        self.memory_probe = memory.probe(self.engine, shapes, share=self.gpu_share)

    def progress(self, task_id: str) -> tuple[int, int] | None:
        return self._progress.get(task_id)

    def cancel(self, task_id: str) -> None:
        self._cancelled.add(task_id)

    def check_health(self) -> None:
        """Raises once the engine is unusable (a CUDA OOM or other CUDA failure broke it)."""
        self.engine.health()

    def stats(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"model": self.name, "device": self.device, "gpu_share": self.gpu_share,
                "assigned_resources": ctx.get_assigned_resources(),
                "gpu_ids": ctx.get_accelerator_ids().get("GPU", []), "placement": self.placement.as_dict(),
                "batches_run": self.batches_run, "images_done": self.images_done,
                "images_cancelled": self.images_cancelled, "load_s": self.load_s,
                "memory_probe": self.memory_probe}


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
    """`Diffusion.options(name=cfg.deployment_name, user_config=cfg.batching_user_config()).bind(cfg, telemetry)`."""

    def __init__(self, config: DiffusionModelConfig, telemetry: TelemetryConfig | None = None) -> None:
        setup_telemetry(telemetry, component=config.deployment_name)
        self.server = DiffusionServer(config)
        self._probe = config.probe_memory
        self._probed: tuple[int, float] | None = None  # (max_batch_size, megapixels) proven to fit
        self.batching = config.batching.model_copy(update={"max_batch_megapixels": config.batch_megapixels})
        self._batcher = LazyBatcher(self._run_batch, max_batch_size=self.batching.max_batch_size,
                                    wait_s=self.batching.batch_wait_timeout_s,
                                    priority_of=lambda item: item[0].priority, aging_s=self.batching.priority_aging_s,
                                    cost_of=lambda item: item[0].megapixels)
        self._batcher.set_max_batch_cost(self.batching.max_batch_megapixels)
        self.quality = AdaptiveQuality(config.adaptive_quality)

    @property
    def max_batch_size(self) -> int:
        return self.batching.max_batch_size

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config` (`DiffusionModelConfig.batching_user_config()`: max_batch_size,
        batch_wait_timeout_s, max_batch_megapixels) changes batching without a restart. Serve calls
        this before the replica takes traffic, and again on each `serve deploy` that changes it: a
        budget larger than the one proven is probed first, so a replica never takes a batch its GPU
        share has not held (a failed probe fails the update). The dict crossed Serve as JSON and may
        come from a hand-edited Serve config: it is validated here, once, as `BatchingConfig`."""
        batching = BatchingConfig.model_validate({**self.batching.model_dump(), **user_config})
        if batching.priority_aging_s != self.batching.priority_aging_s:
            raise ValueError("user_config.priority_aging_s: the batcher's aging is fixed at start; change "
                             "batching.priority_aging_s in the app's args instead")
        size, budget = batching.max_batch_size, batching.max_batch_megapixels
        if self._probe and budget is not None and (
                self._probed is None or size > self._probed[0] or budget > self._probed[1]):
            self.server.probe_memory(max_batch_size=size, max_batch_megapixels=budget)
            self._probed = (size, budget)
        self._batcher.set_max_batch_size(size)
        self._batcher.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._batcher.set_max_batch_cost(budget)
        self.batching = batching

    async def _run_batch(self, items: list[tuple[ImageTask, float]]) -> list[_Denoised]:
        # Load falls while the queue drains, with no arrival to see it: observing it here too keeps
        # that drain from counting as calm (hysteresis restores only after hold_s at low water).
        self.quality.observe(self._load())
        if DENOISE_ON_LOOP:  # diagnosis switch (benchmarks): no other Python runs while denoising
            return self.server.denoise(items)
        return await asyncio.to_thread(self.server.denoise, items)

    def _load(self) -> float:
        """Images queued + running per full batch: this replica's own measure of overload."""
        return (self._batcher.queued + self._batcher.running) / max(1, self.max_batch_size)

    async def generate(self, task: ImageTask) -> ImageResult:
        requested_steps = task.steps
        task, degraded = self.quality.apply(task, self._load())
        if degraded:
            metrics.record_degraded(self.server.name, REASON_LOAD)
        with tracing.continue_trace("diffusion.generate", task.trace_context, model=self.server.name,
                                    steps=task.steps, width=task.width, height=task.height, seed=task.seed,
                                    task_id=task.task_id) as span:
            try:
                denoised = await self._batcher.submit((task, time.monotonic()))
            finally:
                if task.task_id is not None:
                    self.server.done(task.task_id)
            tracing.set_attrs(span, batch_size=denoised.batch_size, queue_wait_s=round(denoised.queue_wait_s, 6),
                              compute_s=round(denoised.compute_s, 6))
            result = await self.server.finish(task, denoised)
            result.requested_steps = requested_steps
            if degraded:
                result.degraded, result.degrade_reason = True, REASON_LOAD
            return result

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
        return {**self.server.stats(), "max_batch_size": self.batching.max_batch_size,
                "batch_wait_timeout_s": self.batching.batch_wait_timeout_s,
                "max_batch_megapixels": self.batching.max_batch_megapixels,
                "queued": self._batcher.queued,
                "running": self._batcher.running, "load": round(self._load(), 3),
                "degraded": self.quality.degraded}

    def check_health(self) -> None:
        self.server.check_health()
