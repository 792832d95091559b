"""`GET /v1/models`: image and chat models together, each saying what it is for."""

from __future__ import annotations

from fastapi import APIRouter

from serve_app.chat.adapters import adapter_models
from serve_app.state import ServicesDep
from serve_app.tenancy import CurrentTenant

router = APIRouter(tags=["models"])

_CREATED = 1_700_000_000  # models have no creation date here; OpenAI's field is required


@router.get("/v1/models")
async def list_models(services: ServicesDep, ctx: CurrentTenant) -> dict:
    """Only the models the caller's plan includes, then the LLM LoRA adapters it may use (each with
    `parent`: its base model, as vLLM's OpenAI server lists them)."""
    cfg = services.config
    data = [
        {"id": m.name, "object": "model", "created": _CREATED, "owned_by": "genserve", "capability": "image",
         "family": m.family, "aliases": m.aliases, "native_size": f"{m.native_resolution}x{m.native_resolution}"}
        for m in cfg.diffusion_models
    ] + [
        {"id": m.name, "object": "model", "created": _CREATED, "owned_by": "genserve", "capability": "chat",
         "aliases": m.aliases, "context_length": m.max_model_len}
        for m in cfg.llm_models
    ]
    allowed = [m for m in data if ctx.plan.allows(m["id"]) or any(ctx.plan.allows(a) for a in m["aliases"])]
    return {"object": "list", "data": allowed + await adapter_models(services, ctx)}
