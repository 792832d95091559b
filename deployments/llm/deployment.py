"""The LLM Serve deployment: a thin wrapper that builds an engine from config and serves LLMServer.

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

from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve

from deployments.llm.coalesce import coalesce
from deployments.llm.config import LLMModelConfig
from deployments.llm.engine import LLMEngine, build_engine, resolve_engine_kind
from deployments.llm.server import LLMServer
from deployments.llm.types import ChoiceDelta, GenerationRequest, GenerationResult, Started, StreamItem
from deployments.placement import current_assignment
from telemetry import TelemetryConfig, setup_telemetry, tracing


class LLMReplica:
    """Plain class (no Ray): what the Serve deployment runs; tests build it with any engine."""

    def __init__(self, config: LLMModelConfig, *, work_dir: str | Path | None = None,
                 engine: LLMEngine | None = None) -> None:
        if engine is None:
            kind = resolve_engine_kind(config.engine)
            kwargs = config.resolved_engine_kwargs()  # + tensor/pipeline parallel sizes
            if work_dir is not None and kind == "vllm":  # vLLM/inductor caches inside the work dir
                kwargs.setdefault("cache_dir", str(Path(work_dir) / "cache"))
            engine = build_engine(config.model, engine=kind, max_model_len=config.max_model_len,
                                  dtype=config.dtype, device=config.device, engine_kwargs=kwargs)
        self.config = config
        self._open_streams = 0
        self.server = LLMServer(engine, model_name=config.name, default_max_tokens=config.default_max_tokens)

    async def start(self) -> None:
        await self.server.start()

    async def generate_stream(self, req: GenerationRequest) -> AsyncIterator[list[StreamItem]]:
        cfg = self.config
        stream = self.server.stream(req)
        span = tracing.start_remote_span("llm.stream", req.trace_context, model=self.config.name, n=req.n,
                                         max_tokens=req.max_tokens)
        completion_tokens = 0
        counted = False
        try:
            # Started goes out at once (the caller waits on it to pick an HTTP status) ...
            started = await stream.__anext__()
            if isinstance(started, Started):
                tracing.set_attrs(span, prompt_tokens=started.prompt_tokens)
            yield [started]
            self._open_streams += 1
            counted = True
            if cfg.stream_interval_ms == 0:
                async for item in stream:
                    completion_tokens += item.num_tokens if isinstance(item, ChoiceDelta) else 0
                    yield [item]
                return
            # ... then deltas: the first at once (TTFT), the rest coalesced per interval (while
            # the replica is busy, see `_stream_interval_s`), one Serve stream message per batch
            # of tokens instead of one per token.
            async for batch in coalesce(stream, self._stream_interval_s):
                completion_tokens += sum(d.num_tokens for d in batch if isinstance(d, ChoiceDelta))
                yield batch
        except Exception as exc:  # a disconnect (cancel) is not an error of the stream
            tracing.record_error(span, exc)
            raise
        finally:
            if counted:
                self._open_streams -= 1
            tracing.set_attrs(span, completion_tokens=completion_tokens)
            span.end()
            await stream.aclose()

    def _stream_interval_s(self) -> float:
        """Per token while few streams are open (latency), per interval while many are (throughput)."""
        if self._open_streams <= self.config.stream_coalesce_above:
            return 0.0
        return self.config.stream_interval_ms / 1000

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        with tracing.continue_trace("llm.generate", req.trace_context, model=self.config.name, n=req.n,
                                    max_tokens=req.max_tokens) as span:
            result = await self.server.generate(req)
            tracing.set_attrs(span, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                              ttft_s=result.timings.get("ttft_s"))
            return result

    async def count_tokens(self, text: str) -> int:
        return self.server.count_tokens(text)

    def stats(self) -> dict[str, Any]:
        return {**self.server.stats(), "placement": current_assignment().as_dict()}

    async def check_health(self) -> None:
        await self.server.check_health()

    async def shutdown(self) -> None:
        await self.server.engine.shutdown()


@serve.deployment(name="LLM", max_ongoing_requests=64, health_check_period_s=10)
class LLMDeployment(LLMReplica):
    """`LLMDeployment.options(name=cfg.deployment_name).bind(cfg, work_dir=..., telemetry=...)`."""

    async def __init__(self, config: LLMModelConfig, *, work_dir: str | Path | None = None,
                       telemetry: TelemetryConfig | None = None) -> None:
        setup_telemetry(telemetry, component=config.deployment_name)
        LLMReplica.__init__(self, config, work_dir=work_dir)
        await self.start()

    async def __del__(self) -> None:
        await self.shutdown()
