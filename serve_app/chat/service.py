"""Chat and completion logic of the ingress: model lookup, the call through the LLM handle, and
the mapping of the deployment's stream into OpenAI responses and chunks.

A streamed call awaits the replica's first item (`Started`) before it returns, so a request the
replica rejects (prompt too long, ...) still gets its HTTP status instead of a broken stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.llm.types import (
    ChoiceDelta,
    GenerationRequest,
    GenerationResult,
    LLMRequestError,
    LoRAAdapter,
    Started,
)
from serve_app.chat.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    Usage,
    finish_reason_for_api,
)
from serve_app.errors import APIError, bad_request, is_backend_at_capacity, not_found, unavailable
from serve_app.state import Services
from telemetry import tracing
from telemetry.context import phase
from telemetry.metrics import StreamTimer

logger = logging.getLogger("genserve.chat")


class Meter(Protocol):
    """Where streamed usage is counted (a tenancy Admission)."""

    def add(self, *, prompt_tokens: int = 0, completion_tokens: int = 0, gpu_seconds: float = 0.0) -> None: ...


class _GpuMeter:
    """The replica reports a request's GPU-seconds cumulatively on each delta; the meter is given
    the growth since the last chunk sent, so what is recorded is the latest figure sent."""

    __slots__ = ("_meter", "_seen")

    def __init__(self, meter: Meter | None) -> None:
        self._meter, self._seen = meter, 0.0

    def sent(self, gpu_seconds: float) -> None:
        if self._meter is not None and gpu_seconds > self._seen:
            self._meter.add(gpu_seconds=gpu_seconds - self._seen)
            self._seen = gpu_seconds


@dataclass
class LLMTarget:
    name: str  # canonical model name (aliases resolved)
    max_model_len: int
    handle: Any  # DeploymentHandle of the LLM deployment (with an adapter: its multiplexed model id set)
    adapter: LoRAAdapter | None = None  # a LoRA adapter (chat/adapters.py resolves it)
    served_as: str = ""  # what responses name as `model` (the adapter's form as asked); "" = `name`

    @property
    def response_model(self) -> str:
        return self.served_as or self.name

    def request(self, req: GenerationRequest) -> GenerationRequest:
        """The request as the replica gets it: with this target's adapter."""
        return req if self.adapter is None else dataclasses.replace(req, adapter=self.adapter)


def resolve_llm(services: Services, model: str | None) -> LLMTarget:
    """The LLM a request names (None: the first configured one), or a 404/503 APIError."""
    cfgs = services.config.llm_models
    cfg = services.config.find_llm(model) if model is not None else (cfgs[0] if cfgs else None)
    if cfg is None:
        known = [m.name for m in cfgs]
        if model is not None and services.config.find_diffusion(model) is not None:
            raise bad_request(f"The model {model!r} generates images; use /v1/images/generations. "
                              f"Chat models: {known}.", param="model", code="model_not_supported")
        raise not_found(f"The model {model!r} does not exist. Chat models: {known}.", param="model",
                        code="model_not_found")
    handle = services.llm.get(cfg.name)
    if handle is None:
        raise unavailable(f"The model {cfg.name!r} is configured but not deployed.")
    return LLMTarget(cfg.name, cfg.max_model_len, handle)


def to_api_error(exc: BaseException) -> BaseException:
    """Map what a handle call raised to an APIError where the client is the cause or should retry."""
    cause = getattr(exc, "cause", None)
    for e in (exc, cause):
        if isinstance(e, APIError):
            return e
        if isinstance(e, LLMRequestError):
            return APIError(e.status, e.message, param=e.param, code=e.code)
    if is_backend_at_capacity(exc):
        return unavailable(f"The chat model is overloaded or starting ({type(exc).__name__}); retry shortly.")
    return exc


def _check_max_tokens(target: LLMTarget, max_tokens: int | None) -> None:
    if max_tokens is not None and max_tokens >= target.max_model_len:
        raise bad_request(
            f"max_tokens ({max_tokens}) must be less than the context of {target.name!r} "
            f"({target.max_model_len} tokens, prompt included).", param="max_tokens",
            code="context_length_exceeded")


async def generate(target: LLMTarget, req: GenerationRequest) -> GenerationResult:
    with tracing.span("llm.call", kind=tracing.SpanKind.CLIENT, model=target.name):
        try:
            return await target.handle.generate.remote(dataclasses.replace(req, trace_context=tracing.outgoing()))
        except Exception as exc:
            raise to_api_error(exc) from exc


async def open_stream(target: LLMTarget, req: GenerationRequest,
                      gate: Awaitable[Any] | None = None) -> tuple[Started, AsyncIterator[list]]:
    """Send the request, then wait for the replica's `Started`. With a `gate` (the request's
    admission, still running), the replica starts while the gate is awaited; if the gate raises,
    the generation is cancelled and its error raised, before any token reaches the client."""
    # No client span: the stream outlives this call; the replica's span is the request span's child.
    req = dataclasses.replace(req, trace_context=tracing.outgoing())
    with phase("llm"):  # until the replica accepted the request (its `Started`)
        gen = target.handle.options(stream=True).generate_stream.remote(req)
        try:
            if gate is not None:
                await asyncio.shield(gate)  # shield: the admission must finish (or its slot would leak)
            first = await gen.__anext__()
        except Exception as exc:
            gen.cancel()
            raise to_api_error(exc) from exc
        except BaseException:  # cancelled (client gone): stop the replica's work too
            gen.cancel()
            raise
    started = first[0]
    assert isinstance(started, Started), f"LLM stream began with {started!r}"
    return started, gen


async def _deltas(gen: Any) -> AsyncIterator[ChoiceDelta]:
    """Flatten the replica's batches; merge each batch's deltas per choice (fewer SSE events)."""
    finished = False
    try:
        async for batch in gen:
            merged: dict[int, ChoiceDelta] = {}
            for d in batch:
                prev = merged.get(d.index)
                merged[d.index] = d if prev is None else ChoiceDelta(
                    d.index, prev.text + d.text, prev.num_tokens + d.num_tokens, d.finish_reason,
                    max(prev.gpu_seconds, d.gpu_seconds))
            for d in merged.values():
                yield d
        finished = True
    except Exception as exc:
        raise to_api_error(exc) from exc
    finally:
        if not finished:  # client gone or failure: stop the generation in the replica
            gen.cancel()


# -- chat -------------------------------------------------------------------------------------


async def chat_completion(services: Services, body: ChatCompletionRequest, meter: Meter | None = None,
                          target: LLMTarget | None = None) -> ChatCompletionResponse:
    target = target or resolve_llm(services, body.model)
    _check_max_tokens(target, body.max_tokens or body.max_completion_tokens)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    result = await generate(target, target.request(body.to_generation_request(rid)))
    if meter is not None:
        meter.add(gpu_seconds=result.gpu_seconds)
    return ChatCompletionResponse(
        id=rid, model=target.response_model,
        choices=[ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                            finish_reason=finish_reason_for_api(c.finish_reason)) for c in result.choices],
        usage=Usage.of(result.prompt_tokens, result.completion_tokens),
    )


async def chat_completion_stream(services: Services, body: ChatCompletionRequest, meter: Meter | None = None,
                                 gate: Awaitable[Any] | None = None,
                                 target: LLMTarget | None = None) -> AsyncIterator[ChatCompletionChunk]:
    target = target or resolve_llm(services, body.model)
    _check_max_tokens(target, body.max_tokens or body.max_completion_tokens)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    timer = StreamTimer(target.name)
    started, gen = await open_stream(target, target.request(body.to_generation_request(rid)), gate)
    if meter is not None:
        meter.add(prompt_tokens=started.prompt_tokens)
    gpu = _GpuMeter(meter)

    async def chunks() -> AsyncIterator[ChatCompletionChunk]:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, model=target.response_model, choices=choices, usage=usage)

        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(body.n)])
        completion = 0
        async for d in _deltas(gen):
            completion += d.num_tokens
            if d.text or d.finish_reason:
                yield chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text or None),
                                             finish_reason=finish_reason_for_api(d.finish_reason))])
                timer.sent(d.num_tokens)
            if meter is not None:  # reached once the consumer came back, i.e. the chunk was sent
                meter.add(completion_tokens=d.num_tokens)
            gpu.sent(d.gpu_seconds)
        if body.include_usage:
            yield chunk([], Usage.of(started.prompt_tokens, completion))

    return chunks()


# -- completions ------------------------------------------------------------------------------


async def completion(services: Services, body: CompletionRequest, meter: Meter | None = None,
                     target: LLMTarget | None = None) -> CompletionResponse:
    target = target or resolve_llm(services, body.model)
    _check_max_tokens(target, body.max_tokens)
    rid = f"cmpl-{uuid.uuid4().hex}"
    result = await generate(target, target.request(body.to_generation_request(rid)))
    if meter is not None:
        meter.add(gpu_seconds=result.gpu_seconds)
    prefix = body.prompt_text if body.echo else ""
    return CompletionResponse(
        id=rid, model=target.response_model,
        choices=[CompletionChoice(index=c.index, text=prefix + c.text,
                                  finish_reason=finish_reason_for_api(c.finish_reason)) for c in result.choices],
        usage=Usage.of(result.prompt_tokens, result.completion_tokens),
    )


async def completion_stream(services: Services, body: CompletionRequest, meter: Meter | None = None,
                            gate: Awaitable[Any] | None = None,
                            target: LLMTarget | None = None) -> AsyncIterator[CompletionResponse]:
    target = target or resolve_llm(services, body.model)
    _check_max_tokens(target, body.max_tokens)
    rid = f"cmpl-{uuid.uuid4().hex}"
    timer = StreamTimer(target.name)
    started, gen = await open_stream(target, target.request(body.to_generation_request(rid)), gate)
    if meter is not None:
        meter.add(prompt_tokens=started.prompt_tokens)
    gpu = _GpuMeter(meter)

    async def chunks() -> AsyncIterator[CompletionResponse]:
        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
            return CompletionResponse(id=rid, model=target.response_model, choices=choices, usage=usage)

        if body.echo:
            yield chunk([CompletionChoice(index=i, text=body.prompt_text, finish_reason=None)
                         for i in range(body.n)])
        completion_tokens = 0
        async for d in _deltas(gen):
            completion_tokens += d.num_tokens
            if d.text or d.finish_reason:
                yield chunk([CompletionChoice(index=d.index, text=d.text,
                                              finish_reason=finish_reason_for_api(d.finish_reason))])
                timer.sent(d.num_tokens)
            if meter is not None:
                meter.add(completion_tokens=d.num_tokens)
            gpu.sent(d.gpu_seconds)
        if body.include_usage:
            yield chunk([], Usage.of(started.prompt_tokens, completion_tokens))

    return chunks()

