"""HTTP routes for chat and text completions: auth and quota around `chat.service`; JSON, or SSE
when `stream` is set. Usage is settled once per request, streamed ones with what was sent."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Response

from serve_app.chat import service, sse
from serve_app.chat.adapters import resolve_chat_target
from serve_app.chat.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from serve_app.errors import is_server_fault
from serve_app.state import ServicesDep
from serve_app.tenancy import (
    Admission,
    CurrentTenant,
    MeteredStreamingResponse,
    TenancyDep,
    TenantContext,
    ensure_model_allowed,
)
from serve_app.tenancy.service import settle_when_admitted, status_of
from telemetry import metrics

router = APIRouter(tags=["chat"])


def _estimate_tokens(services: ServicesDep, model: str, prompt_chars: int, max_tokens: int | None, n: int) -> int:
    """An upper-ish bound held from the token window and budget, corrected at settle."""
    cfg = services.config.find_llm(model)
    out = max_tokens or (cfg.default_max_tokens if cfg else 256)
    return prompt_chars // 3 + 1 + out * n


def _admission(services: ServicesDep, ctx: TenantContext, tenancy: TenancyDep, route: str,
               target: service.LLMTarget, prompt_chars: int, max_tokens: int | None, n: int) -> Awaitable[Admission]:
    """The checks that need no database (the plan allows the model) now; the admission itself
    (rate windows, slot, budget hold) as the returned awaitable. `target`: the model (and adapter)
    `resolve_chat_target` found, before any GPU work (an unknown adapter is a 404 there)."""
    ensure_model_allowed(ctx, target.name, services.config.find_llm(target.name).aliases)
    return tenancy.admit(ctx, route=route, model=target.name,
                         est_tokens=_estimate_tokens(services, target.name, prompt_chars, max_tokens, n))


class _AdmittedMeter:
    """The stream's meter before its admission is known: the service only counts after the gate
    (the same admission) passed, so by then the task holds it."""

    def __init__(self, admission: asyncio.Task) -> None:
        self._admission = admission

    def add(self, **usage: Any) -> None:
        self._admission.result().add(**usage)


async def _admitted_stream(tenancy: TenancyDep, ctx: TenantContext, admission: Awaitable[Admission],
                           open_stream: Callable[..., Awaitable[Any]]) -> MeteredStreamingResponse:
    """Admission, then the stream; or both at once where the overlap guard allows it
    (tenancy/overlap.py): the LLM replica starts while the database decides."""
    guard = tenancy.overlap
    if guard is None or not guard.enter(ctx.tenant_id):
        adm = await admission  # cancelled while admitting: `admit` frees what it grants
        try:
            chunks = await open_stream(meter=adm)
        except BaseException as e:
            adm.refund_request = is_server_fault(e)
            await adm.settle(status_of(e))
            raise
        return _streaming(chunks, adm)
    task = asyncio.ensure_future(admission)
    refused = False
    try:
        try:
            chunks = await open_stream(meter=_AdmittedMeter(task), gate=task)
        except BaseException as e:
            # The stream failed or was refused; the admission's own answer comes first (as if in
            # order). An admission that passed is settled — now, or whenever it completes if we
            # are cancelled first — never left holding its slot.
            settle_when_admitted(task, status_of(e) or "error", refund_request=is_server_fault(e))
            try:
                await asyncio.shield(task)
            except BaseException:
                refused = not task.cancelled() and task.done() and task.exception() is not None
                raise  # the admission's answer (a 429), or this request's own cancellation
            raise
    finally:
        guard.leave(ctx.tenant_id, refused=refused)
        metrics.record_admission_overlap("refused" if refused else "admitted")
    return _streaming(chunks, task.result())


def _streaming(chunks, adm: Admission) -> MeteredStreamingResponse:  # type: ignore[no-untyped-def]
    return MeteredStreamingResponse(sse.sse(chunks), adm, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, services: ServicesDep, ctx: CurrentTenant,
                                 tenancy: TenancyDep, response: Response):  # type: ignore[no-untyped-def]
    chars = sum(len(str(m.content or "")) for m in body.messages)
    target = await resolve_chat_target(services, ctx, body.model)
    admission = _admission(services, ctx, tenancy, "chat", target, chars,
                           body.max_tokens or body.max_completion_tokens, body.n)
    if body.stream:
        return await _admitted_stream(tenancy, ctx, admission,
                                      functools.partial(service.chat_completion_stream, services, body, target=target))
    adm = await admission
    async with adm:
        result = await service.chat_completion(services, body, meter=adm, target=target)
        adm.set_usage(result.usage.model_dump())
    response.headers.update(adm.headers())
    return result


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, services: ServicesDep, ctx: CurrentTenant,
                            tenancy: TenancyDep, response: Response):  # type: ignore[no-untyped-def]
    target = await resolve_chat_target(services, ctx, body.model)
    admission = _admission(services, ctx, tenancy, "completions", target, len(body.prompt_text),
                           body.max_tokens, body.n)
    if body.stream:
        return await _admitted_stream(tenancy, ctx, admission,
                                      functools.partial(service.completion_stream, services, body, target=target))
    adm = await admission
    async with adm:
        result = await service.completion(services, body, meter=adm, target=target)
        adm.set_usage(result.usage.model_dump())
    response.headers.update(adm.headers())
    return result
