"""Running one batch on the engine, and turning each image of it into an `ImageResult`.

`denoise` is the batch (the engine's thread; the GPU is free again when it returns raw images);
`finish` encodes one image's PNG in a thread pool on its caller's coroutine, so encoding overlaps
the next batch instead of holding the GPU idle.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from deployments.diffusion.progress import TaskProgress
from deployments.diffusion.types import ImageResult, ImageTask
from telemetry import metrics

# zlib level 1: 3-5x faster than the default 6 for ~10-30 % larger files; encoding runs beside
# the next batch on the replica's CPUs, so cheaper encoding leaves more CPU for launching kernels.
PNG_COMPRESS_LEVEL = 1


@dataclass
class Denoised:
    image: Any  # PIL.Image, or the exception that failed this image's group
    batch_size: int
    compute_s: float
    queue_wait_s: float


class BatchRunner:
    def __init__(self, engine: Any, progress: TaskProgress, *, model: str, gpu_share: float | None = None) -> None:
        self.engine = engine
        self.gpu_share = gpu_share if gpu_share else 1.0  # None on CPU: replica-seconds
        self.progress = progress
        self.model = model
        self._png_pool = ThreadPoolExecutor(max_workers=max(2, (os.cpu_count() or 2) // 2),
                                            thread_name_prefix="png")
        self.batches_run = 0
        self.images_done = 0
        self.images_cancelled = 0

    def denoise(self, items: list[tuple[ImageTask, float]]) -> list[Denoised]:
        """One batch of (task, enqueued at); blocking (the caller runs it in a thread)."""
        started = time.monotonic()
        tasks = [t for t, _ in items]
        self.progress.batch_started()
        previews = {"on_preview": self.progress.on_preview} if getattr(self.engine, "previews", None) else {}
        images = self.engine.generate_images(tasks, on_step=self.progress.on_step,
                                             should_cancel=self.progress.should_cancel, **previews)
        compute_s = time.monotonic() - started
        self.batches_run += 1
        groups: dict[tuple, int] = {}
        key = getattr(self.engine, "group_key", ImageTask.group_key)
        for t in tasks:  # the engine runs one pipeline call per group key (mixed-LoRA groups may split)
            groups[key(t)] = groups.get(key(t), 0) + 1
        metrics.record_batch(self.model, groups.values(), [max(0.0, started - enq) for _, enq in items])
        return [Denoised(img, len(tasks), compute_s, max(0.0, started - enq)) for img, (_, enq) in
                zip(images, items, strict=True)]

    async def finish(self, task: ImageTask, d: Denoised) -> ImageResult:
        from deployments.diffusion.engine import GenerationCancelled
        from deployments.diffusion.png import image_result

        previews = getattr(self.engine, "previews", None)
        if isinstance(d.image, BaseException):
            if previews is not None and task.task_id is not None:
                previews.forget(task.task_id)
            if isinstance(d.image, GenerationCancelled):
                self.images_cancelled += 1
            raise d.image
        if previews is not None and task.task_id is not None:
            await previews.flush(task.task_id)  # its previews reach the caller before the image
        result = await asyncio.get_running_loop().run_in_executor(self._png_pool, functools.partial(
            image_result, task, d.image, model=self.model, batch_size=d.batch_size, compute_s=d.compute_s,
            queue_wait_s=d.queue_wait_s, compress_level=PNG_COMPRESS_LEVEL))
        result.gpu_share = self.gpu_share
        self.images_done += 1
        if task.task_id is not None:
            self.progress.finished(task.task_id)
        return result

    def stats(self) -> dict:
        return {"batches_run": self.batches_run, "images_done": self.images_done,
                "images_cancelled": self.images_cancelled}
