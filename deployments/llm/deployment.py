"""The LLM Serve deployment: a thin wrapper that builds an engine from config and serves LLMServer.

The ingress calls, through a DeploymentHandle:
  - `handle.options(stream=True).generate_stream.remote(req)` -> lists of StreamItem
    (first list is `[Started]`; then the first ChoiceDelta at once, the rest coalesced every
    `stream_batch_ms`);
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
from deployments.llm.engine import LLMEngine, build_engine, resolve_engine_kind
from deployments.llm.server import LLMServer
from deployments.llm.types import ChoiceDelta, GenerationRequest, GenerationResult, Started, StreamItem
from serve_app.telemetry import setup_telemetry, tracing


class LLMReplica:
    """Plain class (no Ray): what the Serve deployment runs; tests build it with any engine."""

    def __init__(
        self,
        model_config: dict[str, Any],
        *,
        work_dir: str | None = None,
        stream_batch_ms: float = 50.0,
        engine: LLMEngine | None = None,
    ) -> None:
        from serve_app.config import LLMModelConfig  # the one schema for model configs

        cfg = LLMModelConfig.model_validate(model_config)
        if stream_batch_ms < 0:
            raise ValueError(f"stream_batch_ms must be >= 0, got {stream_batch_ms}")
        if engine is None:
            kind = resolve_engine_kind(cfg.engine)
            kwargs = dict(cfg.engine_kwargs)
            if work_dir is not None and kind == "vllm":  # vLLM/inductor caches inside the work dir
                kwargs.setdefault("cache_dir", str(Path(work_dir) / "cache"))
            engine = build_engine(cfg.model, engine=kind, max_model_len=cfg.max_model_len,
                                  dtype=cfg.dtype, device=cfg.device, engine_kwargs=kwargs)
        self.config = cfg
        self.stream_batch_ms = stream_batch_ms
        self._open_streams = 0
        self.server = LLMServer(engine, model_name=cfg.name, default_max_tokens=cfg.default_max_tokens)

    async def start(self) -> None:
        await self.server.start()

    async def generate_stream(self, req: GenerationRequest) -> AsyncIterator[list[StreamItem]]:
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
            if self.stream_batch_ms == 0:
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
        return self.stream_batch_ms / 1000

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
        return self.server.stats()

    async def check_health(self) -> None:
        await self.server.check_health()

    async def shutdown(self) -> None:
        await self.server.engine.shutdown()


@serve.deployment(name="LLM", max_ongoing_requests=64, health_check_period_s=10)
class LLMDeployment(LLMReplica):
    """`LLMDeployment.options(name=cfg.deployment_name).bind(cfg.model_dump(mode="json"), work_dir=...)`."""

    async def __init__(self, model_config: dict[str, Any], *, work_dir: str | None = None,
                       stream_batch_ms: float = 50.0, telemetry: dict | None = None) -> None:
        setup_telemetry(telemetry, component=f"LLM-{model_config.get('name')}")
        LLMReplica.__init__(self, model_config, work_dir=work_dir, stream_batch_ms=stream_batch_ms)
        await self.start()

    async def __del__(self) -> None:
        await self.shutdown()
