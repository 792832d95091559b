"""`DiffusionServer`: one diffusion replica's serving logic, Ray-Serve-free and testable without Ray
(the Serve deployment, deployment.py, only builds it and forwards calls).

Requests are single images (`ImageTask`). The replica's batcher (batcher.py: formed when the GPU
frees up, highest priority first, within the memory budget) gathers them from all callers into
one denoising call; adaptive quality (quality.py) lowers steps while the replica is overloaded;
`BatchRunner` (runner.py) runs the batch and encodes each PNG beside the next one; `TaskProgress`
(progress.py) tracks steps, cancellation and step events. A `user_config` from Serve changes
batching in place (`reconfigure`), after proving a larger memory budget fits (memory.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from deployments.adapters import AdapterSource, parse_multiplexed_id
from deployments.diffusion import device
from deployments.diffusion.batcher import LazyBatcher
from deployments.diffusion.config import BatchingConfig, DiffusionModelConfig
from deployments.diffusion.progress import TaskProgress
from deployments.diffusion.quality import REASON_LOAD, AdaptiveQuality
from deployments.diffusion.runner import BatchRunner, Denoised
from deployments.diffusion.types import ImageResult, ImageTask, PartialImage
from deployments.placement import place_replica
from telemetry import metrics, tracing

if TYPE_CHECKING:
    from deployments.diffusion.lora import LoraManager

logger = logging.getLogger("genserve.diffusion")

DENOISE_ON_LOOP = os.environ.get("GENSERVE_DENOISE_ON_LOOP") == "1"


class DiffusionServer:
    """`DiffusionServer(config)` loads the engine the config names; `engine=` injects one."""

    def __init__(self, config: DiffusionModelConfig, *, engine: Any = None,
                 adapters: AdapterSource | None = None) -> None:
        from deployments.diffusion.engine import DiffusionEngine  # torch + diffusers: import in the replica
        from deployments.diffusion.warmup import warm_up

        self.config = config
        self.name = config.name
        # The GPU Ray assigned (pinned, memory capped to the share) or cpu: deployments/placement.py.
        self.device, self.placement, self.gpu_share = place_replica(config.device)
        device.set_cpu_threads(self.device)
        t0 = time.monotonic()
        warm = engine is None
        if engine is None:
            engine = DiffusionEngine.from_config(config, self.device)
        self.engine = engine
        self.loras: LoraManager | None = None
        self.lora_set_requests = 0  # requests that named an adapter set (the multiplexed hit-rate denominator)
        if adapters is not None and config.serves_loras:
            from deployments.diffusion.lora import LoraManager

            # Before the warm-up: on a compiled engine the manager puts placeholder LoRA layers into
            # the UNet (lora_slots.py), and the warm-up must compile the UNet with them.
            self.loras = LoraManager(engine.pipeline, adapters, slots=config.lora.max_adapters_per_replica,
                                     hotswap_target_rank=config.lora.hotswap_target_rank,
                                     hotswap_target_modules=config.lora.hotswap_target_modules)
            engine.adapters = self.loras
        if warm:
            warm_up(engine, config)  # compile the size buckets now: no request pays a compile
        self.load_s = time.monotonic() - t0
        logger.info("model %s (%s) loaded on %s in %.1fs", self.name, config.model, self.device, self.load_s)
        self.progress = TaskProgress(self.name)
        self.runner = BatchRunner(self.engine, self.progress, model=self.name, gpu_share=self.gpu_share)
        self.quality = AdaptiveQuality(config.adaptive_quality)
        self.batching = config.batching.model_copy(update={"max_batch_megapixels": config.batch_megapixels})
        self.batcher = LazyBatcher(self._run_batch, max_batch_size=self.batching.max_batch_size,
                                   wait_s=self.batching.batch_wait_timeout_s,
                                   priority_of=lambda item: item[0].priority, aging_s=self.batching.priority_aging_s,
                                   cost_of=lambda item: item[0].megapixels)
        self.batcher.set_max_batch_cost(self.batching.max_batch_megapixels)
        self.memory_probe: dict[str, Any] | None = None
        self._probed: tuple[int, float] | None = None  # (max_batch_size, megapixels) proven to fit

    # -- batching ---------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config` (`DiffusionModelConfig.batching_user_config()`: max_batch_size,
        batch_wait_timeout_s, max_batch_megapixels) changes batching without a restart. Serve applies
        it before the replica takes traffic, and again on each `serve deploy` that changes it: a
        budget larger than the one proven is probed first, so a replica never takes a batch its GPU
        share has not held (a failed probe fails the update). The dict crossed Serve as JSON and may
        come from a hand-edited Serve config: it is validated here, once, as `BatchingConfig`."""
        batching = BatchingConfig.model_validate({**self.batching.model_dump(), **user_config})
        if batching.priority_aging_s != self.batching.priority_aging_s:
            raise ValueError("user_config.priority_aging_s: the batcher's aging is fixed at start; change "
                             "batching.priority_aging_s in the app's args instead")
        size, budget = batching.max_batch_size, batching.max_batch_megapixels
        if self.config.probe_memory and budget is not None and (
                self._probed is None or size > self._probed[0] or budget > self._probed[1]):
            self.probe_memory(max_batch_size=size, max_batch_megapixels=budget)
            self._probed = (size, budget)
        self.batcher.set_max_batch_size(size)
        self.batcher.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.batcher.set_max_batch_cost(budget)
        self.batching = batching

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

    async def _run_batch(self, items: list[tuple[ImageTask, float]]) -> list[Denoised]:
        # Load falls while the queue drains, with no arrival to see it: observing it here too keeps
        # that drain from counting as calm (hysteresis restores only after hold_s at low water).
        self.quality.observe(self.load())
        if DENOISE_ON_LOOP:  # diagnosis switch (benchmarks): no other Python runs while denoising
            return self.runner.denoise(items)
        return await asyncio.to_thread(self.runner.denoise, items)

    def load(self) -> float:
        """Images queued + running per full batch: this replica's own measure of overload."""
        return (self.batcher.queued + self.batcher.running) / max(1, self.batching.max_batch_size)

    # -- adapters ---------------------------------------------------------------------------

    async def stage_adapters(self, model_id: str) -> AdapterSet:
        """Serve's multiplexed loader (deployment.py): make the adapter set `model_id` ready on
        this replica. The returned object's `__del__` (called by Serve on LRU eviction) releases it."""
        if self.loras is None:
            raise ValueError(f"model {self.name!r} serves no LoRA adapters")
        ids = parse_multiplexed_id(model_id)
        await asyncio.to_thread(self.loras.stage, ids)
        return AdapterSet(self.loras, ids)

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, task: ImageTask) -> ImageResult:
        requested_steps = task.steps
        task, degraded = self.quality.apply(task, self.load())
        if degraded:
            metrics.record_degraded(self.name, REASON_LOAD)
        with tracing.continue_trace("diffusion.generate", task.trace_context, model=self.name,
                                    steps=task.steps, width=task.width, height=task.height, seed=task.seed,
                                    task_id=task.task_id) as span:
            try:
                denoised = await self.batcher.submit((task, time.monotonic()))
            finally:
                if task.task_id is not None:
                    self.progress.left_batch(task.task_id)
            tracing.set_attrs(span, batch_size=denoised.batch_size, queue_wait_s=round(denoised.queue_wait_s, 6),
                              compute_s=round(denoised.compute_s, 6))
            result = await self.runner.finish(task, denoised)
            result.requested_steps = requested_steps
            if degraded:
                result.degraded, result.degrade_reason = True, REASON_LOAD
            return result

    async def generate_stream(self, task: ImageTask
                              ) -> AsyncGenerator[dict[str, int] | PartialImage | ImageResult, None]:
        """Step events `{"step", "total"}` and the `PartialImage`s the task asked for while the image
        denoises, then the `ImageResult`. If the caller goes away (a cancelled job, a dead ingress,
        a client that closed its stream), the task is cancelled (progress.py)."""
        if task.task_id is None:
            raise ValueError("generate_stream needs task.task_id")
        async with aclosing(self.progress.stream_steps(task.task_id, self.generate(task))) as events:
            async for event in events:
                yield event

    def cancel(self, task_id: str) -> None:
        self.progress.cancel(task_id)

    # -- health and stats -------------------------------------------------------------------

    def check_health(self) -> None:
        """Raises once the engine is unusable (a CUDA OOM or other CUDA failure broke it)."""
        self.engine.health()

    def stats(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        b = self.batching
        return {"model": self.name, "device": self.device, "gpu_share": self.gpu_share, "placement": self.placement.as_dict(),
                "assigned_resources": ctx.get_assigned_resources(),  # type: ignore[no-untyped-call, unused-ignore]
                "gpu_ids": ctx.get_accelerator_ids().get("GPU", []),
                **self.runner.stats(), **(self.engine.previews.stats() if getattr(self.engine, "previews", None) else {}),
                "load_s": self.load_s, "memory_probe": self.memory_probe,
                "max_batch_size": b.max_batch_size, "batch_wait_timeout_s": b.batch_wait_timeout_s,
                "max_batch_megapixels": b.max_batch_megapixels, "queued": self.batcher.queued,
                "running": self.batcher.running, "load": round(self.load(), 3), "degraded": self.quality.degraded,
                **({**self.loras.stats(), "lora_set_requests": self.lora_set_requests} if self.loras is not None else {})}


class AdapterSet:
    """One multiplexed "model": a held adapter set. Serve calls `__del__` when it evicts it (and
    Python may again at collection): releasing is idempotent."""

    def __init__(self, loras: LoraManager, ids: tuple[str, ...]) -> None:
        self.loras, self.ids, self._held = loras, ids, True

    def __del__(self) -> None:
        if self._held:
            self._held = False
            self.loras.release(self.ids)
