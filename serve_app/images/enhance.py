"""`enhance` on image requests, one code path for `/v1/images/generations` and `/v1/jobs`.

Before any quota is taken, `enhance_target` resolves the configured chat model (`enhance_model`,
else the first LLM) and refuses it with 403 when the tenant's plan does not include it, as the
chat route does. Inside the image request's admission, `enhance_admitted` runs the expansion under
an admission of its own (route `enhance`, the chat model): its tokens are held from the token
window and budget up front, then recorded in the ledger like a chat request's. That admission is
a step of the image request: it takes no second request unit or concurrency slot.
"""

from __future__ import annotations

from serve_app.chat.enhance import SYSTEM_PROMPT
from serve_app.chat.service import LLMTarget, resolve_llm
from serve_app.images import service
from serve_app.prompts.render import RenderedImageRequest
from serve_app.state import Services
from serve_app.tenancy import Tenancy, TenantContext, ensure_model_allowed

ROUTE = "enhance"
MAX_TOKENS = 77  # CLIP's window: more expanded prompt than this is cut off by the text encoder


def enhance_target(services: Services, ctx: TenantContext, rendered: RenderedImageRequest) -> LLMTarget | None:
    """The chat model that will expand `rendered` (None if it asks for no enhancement); 404/503
    when none is configured or deployed, 403 `model_not_allowed` when the plan excludes it."""
    if not rendered.enhance:
        return None
    cfg = services.config.enhance_llm
    target = resolve_llm(services, cfg.name if cfg is not None else None)
    ensure_model_allowed(ctx, target.name, services.config.find_llm(target.name).aliases)
    return target


def estimate_tokens(prompt: str) -> int:
    """Upper-ish bound held before the call (as the chat route estimates), corrected at settle."""
    return (len(SYSTEM_PROMPT) + len(prompt)) // 3 + 1 + MAX_TOKENS


async def enhance_admitted(services: Services, tenancy: Tenancy, ctx: TenantContext, target: LLMTarget,
                           rendered: RenderedImageRequest) -> RenderedImageRequest:
    """`rendered` with its prompt expanded by `target`, the tokens admitted and metered (429 when
    the token window or budget can't take them)."""
    admission = await tenancy.admit(ctx, route=ROUTE, model=target.name, est_tokens=estimate_tokens(rendered.prompt),
                                    within_request=True)
    async with admission:
        rendered, expansion = await service.enhance(services, rendered, model=target.name, max_tokens=MAX_TOKENS)
        admission.add(prompt_tokens=expansion.prompt_tokens, completion_tokens=expansion.completion_tokens,
                      gpu_seconds=expansion.gpu_seconds)
    return rendered
