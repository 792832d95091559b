"""Which LLM and LoRA adapter a chat or completion request names (issue 21), resolved at the
ingress before any GPU work, and the adapters `/v1/models` lists.

`model` is a configured model (name or alias), `<base>:<adapter>` (vLLM's and OpenAI fine-tunes'
form), or an adapter's own name (listed in `/v1/models` with `parent: <base>`). Adapters come from
the registry as the caller's tenant sees them (its own, then global ones if its plan allows): an
unknown or invisible adapter is 404, one registered for another base 400, both naming `model`.
A configured model's name wins over an adapter of the same name.
"""

from __future__ import annotations

import dataclasses

from anyio import to_thread

from deployments.llm.types import LoRAAdapter
from serve_app.adapters.types import Adapter
from serve_app.chat.service import LLMTarget, resolve_llm
from serve_app.errors import bad_request, not_found
from serve_app.state import Services
from serve_app.tenancy import TenantContext

_CREATED = 1_700_000_000  # as serve_app/api/models.py


def _registry_lookup(services: Services, ctx: TenantContext, name: str, base: str | None) -> Adapter:
    reg = services.adapters
    if reg is None:
        raise not_found(f"The model {name!r} does not exist (no adapter registry is configured).", param="model",
                        code="model_not_found")
    return reg.resolve(ctx.tenant_id, "llm", name, allow_global=ctx.plan.global_adapters, base_model=base,
                       param="model")


async def resolve_chat_target(services: Services, ctx: TenantContext, model: str | None) -> LLMTarget:
    """The LLM (and adapter) `model` names, as `ctx` may see it; raises an OpenAI-style APIError."""
    if model is None or services.config.find_llm(model) is not None or services.config.find_diffusion(model):
        return resolve_llm(services, model)  # a configured model (or its usual errors)
    base_name, sep, adapter_name = model.rpartition(":")  # adapter names hold no ':'; model names may
    if sep and base_name:
        base = resolve_llm(services, base_name)  # 404 for an unknown base, naming `model`
        adapter = await to_thread.run_sync(_registry_lookup, services, ctx, adapter_name, base.name)
    else:
        adapter = await to_thread.run_sync(_registry_lookup, services, ctx, model, None)
        base = resolve_llm(services, adapter.base_model)
    cfg = services.config.find_llm(base.name)
    if cfg is None or not cfg.lora.enabled:
        raise bad_request(f"The model {base.name!r} serves no LoRA adapters.", param="model",
                          code="model_not_supported")
    lora = LoRAAdapter(id=adapter.id, name=adapter.name, rank=adapter.rank)
    # The multiplexed model id routes the request to a replica that holds the adapter (Serve's
    # model multiplexing; LLMDeployment loads it on a miss).
    return dataclasses.replace(base, handle=base.handle.options(multiplexed_model_id=adapter.id), adapter=lora,
                               served_as=model)


async def adapter_models(services: Services, ctx: TenantContext) -> list[dict[str, object]]:
    """`/v1/models` entries of the LLM adapters the caller may use, each with `parent: <base>`."""
    reg = services.adapters
    if reg is None or not any(m.lora.enabled for m in services.config.llm_models):
        return []
    rows = await to_thread.run_sync(lambda: reg.list(ctx.tenant_id, allow_global=ctx.plan.global_adapters,
                                                     kind="llm", limit=200))
    out: list[dict[str, object]] = []
    seen: set[str] = set()
    for a in rows:  # the tenant's own first: a private adapter shadows a global one of its name
        cfg = services.config.find_llm(a.base_model)
        if cfg is None or not cfg.lora.enabled or a.name in seen or not ctx.plan.allows(cfg.name):
            continue
        seen.add(a.name)
        out.append({"id": a.name, "object": "model", "created": int(a.created_at.timestamp()) or _CREATED,
                    "owned_by": "global" if a.owner is None else ctx.tenant, "capability": "chat",
                    "parent": cfg.name, "root": a.id, "aliases": [f"{cfg.name}:{a.name}"],
                    "context_length": cfg.max_model_len})
    return out
