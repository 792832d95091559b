"""HTTP routes for chat and text completions: auth and quota around `chat.service`; JSON, or SSE
when `stream` is set. Usage is settled once per request, streamed ones with what was sent."""

from __future__ import annotations

from fastapi import APIRouter, Response

from serve_app.chat import service, sse
from serve_app.chat.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from serve_app.state import ServicesDep
from serve_app.tenancy import (
    Admission, CurrentTenant, MeteredStreamingResponse, TenancyDep, TenantContext, ensure_model_allowed,
)

router = APIRouter(tags=["chat"])


def _estimate_tokens(services: ServicesDep, model: str, prompt_chars: int, max_tokens: int | None, n: int) -> int:
    """An upper-ish bound held from the token window and budget, corrected at settle."""
    cfg = services.config.find_llm(model)
    out = max_tokens or (cfg.default_max_tokens if cfg else 256)
    return prompt_chars // 3 + 1 + out * n


async def _admit(services: ServicesDep, ctx: TenantContext, tenancy: TenancyDep, route: str, model: str | None,
                 prompt_chars: int, max_tokens: int | None, n: int) -> Admission:
    target = service.resolve_llm(services, model)
    ensure_model_allowed(ctx, target.name, services.config.find_llm(target.name).aliases)
    return await tenancy.admit(ctx, route=route, model=target.name,
                               est_tokens=_estimate_tokens(services, target.name, prompt_chars, max_tokens, n))


def _streaming(chunks, adm: Admission) -> MeteredStreamingResponse:  # type: ignore[no-untyped-def]
    return MeteredStreamingResponse(sse.sse(chunks), adm, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, services: ServicesDep, ctx: CurrentTenant,
                                 tenancy: TenancyDep, response: Response):  # type: ignore[no-untyped-def]
    chars = sum(len(str(m.content or "")) for m in body.messages)
    adm = await _admit(services, ctx, tenancy, "chat", body.model, chars,
                       body.max_tokens or body.max_completion_tokens, body.n)
    if body.stream:
        try:
            chunks = await service.chat_completion_stream(services, body, meter=adm)
        except BaseException:
            await adm.settle("error")
            raise
        return _streaming(chunks, adm)
    async with adm:
        result = await service.chat_completion(services, body)
        adm.set_usage(result.usage.model_dump())
    response.headers.update(adm.headers())
    return result


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, services: ServicesDep, ctx: CurrentTenant,
                            tenancy: TenancyDep, response: Response):  # type: ignore[no-untyped-def]
    adm = await _admit(services, ctx, tenancy, "completions", body.model, len(body.prompt_text), body.max_tokens,
                       body.n)
    if body.stream:
        try:
            chunks = await service.completion_stream(services, body, meter=adm)
        except BaseException:
            await adm.settle("error")
            raise
        return _streaming(chunks, adm)
    async with adm:
        result = await service.completion(services, body)
        adm.set_usage(result.usage.model_dump())
    response.headers.update(adm.headers())
    return result
