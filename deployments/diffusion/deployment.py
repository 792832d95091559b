"""The diffusion Serve deployment: builds a `DiffusionServer` (server.py) from the model's typed
config and forwards the handle calls to it; nothing else. Layers: `DiffusionEngine` (engine.py:
the diffusers pipelines, no Ray) / `DiffusionServer` (one replica's serving logic: batching,
adaptive quality, progress and streaming, memory probe, reconfigure) / `DiffusionDeployment`.

One deployment per configured model (the graph builder names them `Diffusion-<model>`), bound
with that model's `DiffusionModelConfig` (deployments/diffusion/config.py) and its batching as
`user_config` (`reconfigure`, applied by Serve without a restart).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.adapters import AdapterSource, multiplexed_id
from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.server import AdapterSet, DiffusionServer
from deployments.diffusion.types import ImageResult, ImageTask, PartialImage
from telemetry import TelemetryConfig, setup_telemetry


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
class DiffusionDeployment:
    """`DiffusionDeployment.options(name=cfg.deployment_name, user_config=cfg.batching_user_config())
    .bind(cfg, telemetry)`."""

    def __init__(self, config: DiffusionModelConfig, telemetry: TelemetryConfig | None = None,
                 adapters: AdapterSource | None = None) -> None:
        setup_telemetry(telemetry, component=config.deployment_name)
        self.server = DiffusionServer(config, adapters=adapters)
        # LoRA adapter sets arrive as Serve's multiplexed model id (the ingress sets it with
        # `handle.options(multiplexed_model_id=...)`), so Serve routes a set to replicas that hold
        # it; an LRU of `lora.max_adapters_per_replica` sets per replica (wired here: the size is config).
        async def adapter_set(model_id: str) -> AdapterSet:  # a plain function: Serve keeps its LRU on it
            return await self.server.stage_adapters(model_id)

        self._adapter_set = serve.multiplexed(max_num_models_per_replica=config.lora.max_adapters_per_replica)(
            adapter_set)

    async def _with_adapters(self, task: ImageTask) -> None:
        if task.loras:
            self.server.lora_set_requests += 1
            await self._adapter_set(serve.get_multiplexed_model_id() or multiplexed_id(
                tuple(u.adapter_id for u in task.loras)))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.server.reconfigure(user_config)

    async def generate(self, task: ImageTask) -> ImageResult:
        await self._with_adapters(task)
        return await self.server.generate(task)

    async def generate_stream(self, task: ImageTask
                              ) -> AsyncGenerator[dict[str, int] | PartialImage | ImageResult, None]:
        """Called with `handle.options(stream=True)`; Serve cancels it when the caller goes away."""
        await self._with_adapters(task)
        async with aclosing(self.server.generate_stream(task)) as events:
            async for event in events:
                yield event

    async def progress(self, task_id: str) -> tuple[int, int] | None:
        return self.server.progress.get(task_id)

    async def last_step(self, task_id: str) -> int | None:
        return self.server.progress.last_step.get(task_id)

    async def cancel(self, task_id: str) -> None:
        self.server.cancel(task_id)

    async def stats(self) -> dict[str, Any]:
        # Which replica answered: a caller polling the handle tells replicas apart by it
        # (benchmarks/lora_routing.py sums the multiplexed hits per replica).
        try:
            replica: str | None = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # not inside a Serve replica (a local test calling it directly)
            replica = None
        return {**self.server.stats(), "replica": replica}

    def check_health(self) -> None:
        self.server.check_health()
