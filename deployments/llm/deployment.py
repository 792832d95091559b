"""The LLM Serve deployment: builds an `LLMServer` (server.py) from the model's typed config and
forwards the handle calls to it; nothing else. Layers: `LLMEngine` (engine.py: vLLM or
transformers, runs the model) / `LLMServer` (one replica's serving logic, no Ray) / `LLMDeployment`.

Bound with the model's typed `LLMModelConfig` (deployments/llm/config.py), as Ray's LLM server takes
`LLMConfig`: `LLMDeployment.options(name=cfg.deployment_name).bind(cfg, work_dir=..., telemetry=...)`.

The ingress calls, through a DeploymentHandle:
  - `handle.options(stream=True).generate_stream.remote(req)` -> lists of StreamItem
    (first list is `[Started]`; then the first ChoiceDelta at once, the rest coalesced every
    `LLMModelConfig.stream_interval_ms` while more than `stream_coalesce_above` streams are open);
  - `handle.generate.remote(req)` -> GenerationResult;
  - `handle.count_tokens.remote(text)` -> int; `handle.stats.remote()` -> dict.
When the caller's request is cancelled (client disconnect), Serve cancels `generate_stream` in the
replica; the CancelledError closes the engine stream, which aborts the sequence in the engine.

LoRA (`lora.enabled`): a request with an adapter comes with `multiplexed_model_id=adapter.id`, so
Serve routes it to a replica that holds the adapter. Each replica registers its adapters through
`@serve.multiplexed(max_num_models_per_replica=lora.max_adapters_per_replica)` (built per instance:
the limit comes from the config); Serve's LRU eviction calls `_Resident.__del__`, which hands the
adapter to `AdapterSet.evict` (it leaves the engine once no request runs it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

from ray import serve

from deployments.adapters import AdapterSource
from deployments.llm.adapters import AdapterSet
from deployments.llm.config import LLMModelConfig
from deployments.llm.server import LLMServer
from deployments.llm.types import GenerationRequest, GenerationResult, LoRAAdapter, StreamItem
from telemetry import TelemetryConfig, setup_telemetry


@serve.deployment(name="LLM", max_ongoing_requests=64, health_check_period_s=10)
class LLMDeployment:
    """`LLMDeployment.options(name=cfg.deployment_name).bind(cfg, work_dir=..., telemetry=...,
    adapter_source=...)`."""

    # Ray Serve awaits an async __init__ (the model loads before the replica takes traffic);
    # mypy only knows plain constructors.
    async def __init__(self, config: LLMModelConfig, *, work_dir: str | Path | None = None,  # type: ignore[misc]
                       telemetry: TelemetryConfig | None = None, adapter_source: AdapterSource | None = None) -> None:
        setup_telemetry(telemetry, component=config.deployment_name)
        self.server = LLMServer(config, work_dir=work_dir, adapter_source=adapter_source)
        await self.server.start()
        self._sources: dict[str, LoRAAdapter] = {}  # adapter id -> where to load it from (latest request's)
        self._resident: Callable[[str], Awaitable[_Resident]] | None = None
        if config.lora.enabled:
            adapters, sources = self.server.adapters, self._sources

            async def load_adapter(adapter_id: str) -> _Resident:
                await adapters.load(sources[adapter_id])
                return _Resident(adapters, adapter_id, asyncio.get_running_loop())

            self._resident = serve.multiplexed(max_num_models_per_replica=config.lora.max_adapters_per_replica)(
                load_adapter)

    async def _hold_adapter(self, req: GenerationRequest) -> None:
        """Register the request's adapter with Serve's multiplexer (loads it on a miss, marks it
        recently used on a hit); the Server then holds it for the request's duration."""
        if req.adapter is not None and self._resident is not None:
            self._sources[req.adapter.id] = req.adapter
            await self._resident(req.adapter.id)

    async def generate_stream(self, req: GenerationRequest) -> AsyncGenerator[list[StreamItem], None]:
        await self._hold_adapter(req)
        async with aclosing(self.server.generate_stream(req)) as messages:
            async for message in messages:
                yield message

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        await self._hold_adapter(req)
        return await self.server.generate_traced(req)

    async def count_tokens(self, text: str) -> int:
        return self.server.count_tokens(text)

    def stats(self) -> dict[str, Any]:
        return self.server.stats()

    async def check_health(self) -> None:
        await self.server.check_health()

    async def __del__(self) -> None:
        await self.server.shutdown()


class _Resident:
    """What Serve's multiplexer keeps per adapter. It calls `__del__` when it evicts the adapter
    (in a worker thread); Python calls it again at garbage collection, hence the flag."""

    def __init__(self, adapters: AdapterSet, adapter_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self._adapters, self._id, self._loop = adapters, adapter_id, loop
        self._evicted = False

    def __del__(self) -> None:
        if self._evicted:
            return
        self._evicted = True
        try:
            self._loop.call_soon_threadsafe(self._adapters.evict, self._id)
        except RuntimeError:  # the replica's loop is closed: the engine goes with it
            pass
