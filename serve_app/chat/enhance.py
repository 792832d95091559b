"""Prompt expansion for image generation: the ingress → LLM step of the ingress → LLM → diffusion
chain. The LLM rewrites a short prompt into the structure the image templates use."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from deployments.llm.types import GenerationRequest
from serve_app.chat.service import LLMTarget, generate, resolve_llm
from serve_app.state import Services

SYSTEM_PROMPT = (
    "You expand short image prompts for a text-to-image model. Rewrite the user's prompt as one "
    "paragraph covering, in this order: Subject (who or what, doing what), Style (medium, artist "
    "or movement), Composition (framing, camera angle, lens), Lighting (source, mood, time of "
    "day), Quality (detail, resolution keywords). Keep every element the user asked for, add no "
    "text or watermark, and answer with the prompt only."
)


@dataclass(frozen=True)
class Expansion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    gpu_seconds: float = 0.0  # the LLM replica's share-clock figure (deployments/llm/share_clock.py)


async def expand_prompt(
    services: Services,
    prompt: str,
    *,
    model: str | None = None,
    max_tokens: int = 77,
    seed: int | None = None,
) -> str:
    """The expanded prompt (stripped); falls back to `prompt` if the model returns only blanks.

    `model=None` uses the first configured LLM. Raises APIError (404/503/400) like the chat API.
    """
    return (await expand(services, prompt, model=model, max_tokens=max_tokens, seed=seed)).text


async def expand(services: Services, prompt: str, *, model: str | None = None, max_tokens: int = 77,
                 seed: int | None = None) -> Expansion:
    """`expand_prompt` plus the tokens it used (billed to the image request's tenant)."""
    return await expand_with(resolve_llm(services, model), prompt, max_tokens=max_tokens, seed=seed)


async def expand_with(target: LLMTarget, prompt: str, *, max_tokens: int = 77, seed: int | None = None) -> Expansion:
    """`expand` on an already resolved chat model."""
    req = GenerationRequest(
        request_id=f"enhance-{uuid.uuid4().hex}",
        messages=({"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}),
        max_tokens=max_tokens,
        temperature=0.7,
        top_p=0.95,
        seed=seed,
    )
    result = await generate(target, req)
    text = result.choices[0].text.strip()
    return Expansion(text or prompt, result.prompt_tokens, result.completion_tokens, result.gpu_seconds)
