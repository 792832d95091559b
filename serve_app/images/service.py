"""Image generation: render the request, fan the images out to the model's diffusion replicas."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time

from deployments.diffusion.types import ImageResult
from serve_app.chat.enhance import Expansion, expand
from serve_app.errors import APIError, bad_request, is_backend_at_capacity, unavailable
from serve_app.images.protocol import (GenerationInfo, ImageData, ImageGenerationRequest,
                                       ImageGenerationResponse, PromptRenderRequest)
from serve_app.prompts.render import RenderedImageRequest, TemplateSource, render_image_request
from serve_app.storage import ResultStore, StorageError, result_key
from serve_app.state import Services
from telemetry import tracing


def render(services: Services, req: ImageGenerationRequest | PromptRenderRequest,
           templates: TemplateSource) -> RenderedImageRequest:
    try:
        size = req.parsed_size()
    except ValueError as e:
        raise bad_request(str(e), param="size", code="invalid_size") from None
    return render_image_request(
        config=services.config, templates=templates, prompt=req.prompt, model=req.model, n=req.n,
        size=size, negative_prompt=req.negative_prompt, seed=req.seed, steps=req.steps,
        guidance_scale=req.guidance_scale, template=req.template, template_version=req.template_version,
        variables=req.variables, enhance=getattr(req, "enhance", False), style=req.style)


async def enhance(services: Services, rendered: RenderedImageRequest, *, model: str | None = None,
                  max_tokens: int = 77) -> tuple[RenderedImageRequest, Expansion]:
    """The chain's LLM step: expand the prompt into Subject/Style/Composition/Lighting/Quality,
    then draw that (sizes, seeds and other parameters stay as rendered). Metered by the caller
    (`images.enhance.enhance_admitted`)."""
    exp = await expand(services, rendered.prompt, model=model, max_tokens=max_tokens, seed=rendered.tasks[0].seed)
    tasks = tuple(dataclasses.replace(t, prompt=exp.text, weighted_prompts=()) for t in rendered.tasks)
    return dataclasses.replace(rendered, prompt=exp.text, tasks=tasks), exp


async def run_tasks(services: Services, rendered: RenderedImageRequest) -> list[ImageResult]:
    """All images of one request, in order; each one its own Serve request so batches mix users."""
    handle = services.diffusion.get(rendered.model.name)
    if handle is None:
        raise unavailable(f"Model {rendered.model.name!r} has no running deployment.")
    with tracing.span("diffusion.call", kind=tracing.SpanKind.CLIENT, model=rendered.model.name,
                      images=len(rendered.tasks)):
        ctx = tracing.outgoing()
        try:
            return list(await asyncio.gather(*(handle.generate.remote(dataclasses.replace(t, trace_context=ctx))
                                               for t in rendered.tasks)))
        except Exception as e:  # noqa: BLE001 - mapped to the client-facing error below
            raise map_backend_error(e, rendered.model.name) from None


def map_backend_error(exc: Exception, model: str) -> APIError:
    """Serve's backpressure and replica failures become 503 + Retry-After, never a traceback."""
    if is_backend_at_capacity(exc):
        return unavailable(f"Model {model!r} is at capacity; retry later.", retry_after_s=2,
                           code="at_capacity")
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ValueError):
        return bad_request(str(cause))
    return unavailable(f"Model {model!r} failed to generate ({type(exc).__name__}); retry later.", retry_after_s=2,
                       code="generation_failed")


def gpu_seconds(results: list[ImageResult]) -> float:
    """Each image's share of its batch's compute time (what a GPU-second price bills)."""
    return sum(r.compute_s / max(1, r.batch_size) for r in results)


async def store_results(store: ResultStore, tenant_id: int, results: list[ImageResult]) -> list[str]:
    """Upload the PNGs (retried by the store; a StorageError becomes a 503 with its reason)."""
    try:
        return [await store.aput(result_key(tenant_id), r.png, "image/png") for r in results]
    except StorageError as e:
        raise unavailable(f"Could not store the images: {e.reason}", code="storage_failed") from None


def degradation(results: list[ImageResult]) -> tuple[bool, str | None]:
    """(whether some image ran with fewer steps than asked, why: e.g. `load`)."""
    degraded = [r for r in results if r.degraded]
    return bool(degraded), degraded[0].degrade_reason if degraded else None


def to_response(rendered: RenderedImageRequest, results: list[ImageResult], *, urls: list[str] | None = None,
                generation_id: str | None = None) -> ImageGenerationResponse:
    first = rendered.tasks[0]
    if urls is not None:
        data = [ImageData(url=u, revised_prompt=rendered.prompt, seed=r.seed) for u, r in zip(urls, results)]
    else:
        data = [ImageData(b64_json=base64.b64encode(r.png).decode("ascii"), revised_prompt=rendered.prompt,
                          seed=r.seed) for r in results]
    degraded, reason = degradation(results)
    info = GenerationInfo(model=rendered.model.name, width=first.width, height=first.height,
                          steps=results[0].steps if results else first.steps,
                          guidance_scale=first.guidance_scale, negative_prompt=rendered.negative_prompt,
                          tile=first.tile, batch_sizes=[r.batch_size for r in results],
                          queue_wait_s=[round(r.queue_wait_s, 4) for r in results],
                          compute_s=[round(r.compute_s, 4) for r in results],
                          generation_id=generation_id, steps_used=[r.steps for r in results],
                          degraded=degraded, reason=reason)
    return ImageGenerationResponse(created=int(time.time()), data=data, genserve=info)

