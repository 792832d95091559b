"""`LLMServer`: one LLM replica's serving logic, engine-agnostic and Ray-free (the Serve deployment,
deployment.py, only builds it and forwards calls; tests build it with any engine).

It renders chat messages with the model's chat template and checks the request against the
context (prompt.py), fans `n` out into n engine sequences and merges their deltas into one stream
(`stream`, `generate`), and serves that stream as Serve messages: the first item at once, the
rest coalesced while the replica is busy (`generate_stream`, coalesce.py), traced. The first item
of every stream is `Started`: a caller that awaits it knows the request was accepted (or gets the
`LLMRequestError`) before it commits to an HTTP status.

A request with a LoRA adapter (`req.adapter`) runs while `adapters` (adapters.py) holds that
adapter loaded in the engine; loading it, when needed, happens before `Started`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from deployments.adapters import AdapterSource
from deployments.llm import prompt, share_clock
from deployments.llm.adapters import AdapterSet
from deployments.llm.coalesce import coalesce
from deployments.llm.config import LLMModelConfig
from deployments.llm.engine import LLMEngine, engine_for
from deployments.llm.types import (
    Choice,
    ChoiceDelta,
    GenerationRequest,
    GenerationResult,
    LLMRequestError,
    SamplingParams,
    Started,
    StreamItem,
    TokenDelta,
)
from deployments.placement import current_assignment
from telemetry import tracing


class LLMServer:
    """`LLMServer(config)` builds the engine the config names; `engine=` injects one (tests)."""

    def __init__(self, config: LLMModelConfig, *, engine: LLMEngine | None = None,
                 work_dir: str | Path | None = None, adapter_source: AdapterSource | None = None) -> None:
        self.config = config
        self.engine = engine if engine is not None else engine_for(config, work_dir=work_dir)
        self.model_name = config.name
        self.default_max_tokens = config.default_max_tokens
        self._started = False
        self._open_streams = 0  # streams past `Started`: above `stream_coalesce_above` they coalesce
        self.adapters = AdapterSet(self.engine, max_rank=config.lora.max_lora_rank, source=adapter_source)

    async def start(self) -> None:
        if not self._started:
            await self.engine.start()
            self._started = True

    async def shutdown(self) -> None:
        await self.adapters.drain()
        await self.engine.shutdown()

    # -- prompt handling (prompt.py) ------------------------------------------------------

    def prompt_token_ids(self, req: GenerationRequest) -> list[int]:
        return prompt.prompt_token_ids(self.engine.tokenizer, req)

    def count_tokens(self, text: str) -> int:
        return prompt.count_tokens(self.engine.tokenizer, text)

    def _sampling(self, req: GenerationRequest, prompt_len: int) -> list[SamplingParams]:
        return prompt.sampling_params(req, prompt_len, context=self.engine.max_model_len,
                                      default_max_tokens=self.default_max_tokens)

    # -- generation -----------------------------------------------------------------------

    async def stream(self, req: GenerationRequest) -> AsyncGenerator[StreamItem, None]:
        """Started, then ChoiceDeltas of all n choices as they come (each ends with a finish_reason).
        Each delta carries the request's GPU-seconds so far (share_clock.py); the last one the total.
        With an adapter, all of it runs while the adapter is held loaded."""
        if req.adapter is None:
            async with aclosing(self._stream(req, None)) as items:
                async for item in items:
                    yield item
            return
        if not self.config.lora.enabled:
            raise LLMRequestError(400, f"The model {self.model_name!r} serves no LoRA adapters (lora.enabled is "
                                  "off in its config).", param="model", code="model_not_supported")
        async with self.adapters.use(req.adapter), aclosing(self._stream(req, req.adapter.id)) as items:
            async for item in items:
                yield item

    async def _stream(self, req: GenerationRequest, adapter: str | None) -> AsyncGenerator[StreamItem, None]:
        ids = self.prompt_token_ids(req)
        params = self._sampling(req, len(ids))
        yield Started(req.request_id, len(ids), params[0].max_tokens)
        # On the clock from here until the stream ends, however it ends (finally: leave).
        share = share_clock.clock_for(self).enter(len(params))
        try:
            if len(params) == 1:
                # aclosing: an early close must reach the engine now (abort), not at garbage collection.
                async with aclosing(self._generate(req.request_id, ids, params[0], adapter)) as deltas:
                    async for d in deltas:
                        if d.finish_reason is not None:
                            share.leave()  # the last delta carries the final figure
                        yield ChoiceDelta(0, d.text, len(d.token_ids), d.finish_reason, share.gpu_seconds())
                return
            queue: asyncio.Queue[ChoiceDelta | BaseException] = asyncio.Queue()

            async def pump(i: int, sp: SamplingParams) -> None:
                try:
                    async with aclosing(self._generate(f"{req.request_id}-{i}", ids, sp, adapter)) as deltas:
                        async for d in deltas:
                            await queue.put(ChoiceDelta(i, d.text, len(d.token_ids), d.finish_reason))
                except BaseException as exc:  # surfaced to the consumer, then re-raised there
                    await queue.put(exc)
                    raise

            tasks = [asyncio.create_task(pump(i, sp)) for i, sp in enumerate(params)]
            try:
                done = 0
                while done < len(tasks):
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item.finish_reason is not None:
                        done += 1
                        if done == len(tasks):
                            share.leave()
                    yield ChoiceDelta(item.index, item.text, item.num_tokens, item.finish_reason, share.gpu_seconds())
            finally:
                for t in tasks:  # early close or failure: abort the other choices too
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            share.leave()

    def _generate(self, rid: str, ids: list[int], sp: SamplingParams,
                  adapter: str | None) -> AsyncGenerator[TokenDelta, None]:
        if adapter is None:  # engines without adapters (test doubles) take three arguments
            return self.engine.generate(rid, ids, sp)
        return self.engine.generate(rid, ids, sp, adapter)

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """The whole result, aggregated from `stream` (so streamed and not agree by construction)."""
        t0 = time.perf_counter()
        texts: dict[int, list[str]] = {i: [] for i in range(req.n)}
        counts = [0] * req.n
        reasons: list[Any] = [None] * req.n
        prompt_tokens = 0
        ttft = None
        gpu_seconds = 0.0
        async for item in self.stream(req):
            if isinstance(item, Started):
                prompt_tokens = item.prompt_tokens
                continue
            if ttft is None and item.num_tokens:
                ttft = time.perf_counter() - t0
            texts[item.index].append(item.text)
            counts[item.index] += item.num_tokens
            reasons[item.index] = item.finish_reason or reasons[item.index]
            gpu_seconds = max(gpu_seconds, item.gpu_seconds)
        choices = [Choice(i, "".join(texts[i]), reasons[i], counts[i]) for i in range(req.n)]
        return GenerationResult(req.request_id, choices, prompt_tokens, sum(counts),
                                {"total_s": time.perf_counter() - t0, "ttft_s": ttft or 0.0}, gpu_seconds)

    # -- what the deployment's handle calls run -------------------------------------------

    async def generate_stream(self, req: GenerationRequest) -> AsyncGenerator[list[StreamItem], None]:
        """`stream` as Serve stream messages (lists of items), traced. When the caller's request
        is cancelled (client disconnect), the CancelledError closes `stream`, which aborts the
        sequences in the engine."""
        cfg = self.config
        stream = self.stream(req)
        span = tracing.start_remote_span("llm.stream", req.trace_context, model=cfg.name, n=req.n,
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

    async def generate_traced(self, req: GenerationRequest) -> GenerationResult:
        """`generate` in a span continuing the caller's trace."""
        with tracing.continue_trace("llm.generate", req.trace_context, model=self.config.name, n=req.n,
                                    max_tokens=req.max_tokens) as span:
            result = await self.generate(req)
            tracing.set_attrs(span, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                              ttft_s=result.timings.get("ttft_s"))
            return result

    def stats(self) -> dict[str, Any]:
        out = {"model": self.model_name, "engine": self.engine.name, "running": self.engine.num_running(),
               "max_model_len": self.engine.max_model_len}
        if hasattr(self.engine, "batch_sizes"):  # the transformers engine's recent batches (rows)
            out["recent_batch_sizes"] = list(self.engine.batch_sizes)[-32:]
        if hasattr(self.engine, "scheduler"):
            out["scheduler"] = self.engine.scheduler
            out["engine_process"] = getattr(self.engine, "engine_process", None)  # the transformers engine's
        out["placement"] = current_assignment().as_dict()
        if self.config.lora.enabled:
            out["adapters"] = self.adapters.stats()
        return out

    async def check_health(self) -> None:
        await self.engine.check_health()
