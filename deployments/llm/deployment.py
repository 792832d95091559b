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
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from ray import serve

from deployments.llm.config import LLMModelConfig
from deployments.llm.server import LLMServer
from deployments.llm.types import GenerationRequest, GenerationResult, StreamItem
from telemetry import TelemetryConfig, setup_telemetry


@serve.deployment(name="LLM", max_ongoing_requests=64, health_check_period_s=10)
class LLMDeployment:
    """`LLMDeployment.options(name=cfg.deployment_name).bind(cfg, work_dir=..., telemetry=...)`."""

    # Ray Serve awaits an async __init__ (the model loads before the replica takes traffic);
    # mypy only knows plain constructors.
    async def __init__(self, config: LLMModelConfig, *, work_dir: str | Path | None = None,  # type: ignore[misc]
                       telemetry: TelemetryConfig | None = None) -> None:
        setup_telemetry(telemetry, component=config.deployment_name)
        self.server = LLMServer(config, work_dir=work_dir)
        await self.server.start()

    async def generate_stream(self, req: GenerationRequest) -> AsyncGenerator[list[StreamItem], None]:
        async with aclosing(self.server.generate_stream(req)) as messages:
            async for message in messages:
                yield message

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        return await self.server.generate_traced(req)

    async def count_tokens(self, text: str) -> int:
        return self.server.count_tokens(text)

    def stats(self) -> dict[str, Any]:
        return self.server.stats()

    async def check_health(self) -> None:
        await self.server.check_health()

    async def __del__(self) -> None:
        await self.server.shutdown()
