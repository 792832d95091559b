"""Thin HTTP layer of image generation: auth, quota and the generation log around `images.service`."""

from __future__ import annotations

import dataclasses
import time

import anyio
from fastapi import APIRouter, Request, Response

from serve_app.errors import bad_request
from serve_app.images import qos, service
from serve_app.images.enhance import enhance_admitted, enhance_target
from serve_app.images.protocol import ImageGenerationRequest, ImageGenerationResponse, PromptRenderRequest
from serve_app.library import LIBRARY_KEY
from serve_app.prompts.render import RenderedImageRequest, render_image_request
from serve_app.state import ServicesDep
from serve_app.storage import STORAGE_KEY
from serve_app.tenancy import CurrentTenant, TenancyDep, TenantContext, ensure_model_allowed, ensure_within_plan

router = APIRouter(tags=["images"])


def check_plan(ctx: TenantContext, rendered: RenderedImageRequest) -> None:
    ensure_model_allowed(ctx, rendered.model.name, rendered.model.aliases)
    first = rendered.tasks[0]
    ensure_within_plan(ctx, width=first.width, height=first.height, steps=first.steps)


async def render_for(services: ServicesDep, ctx: TenantContext, body: ImageGenerationRequest | PromptRenderRequest):
    """(rendered request, the template used or None); the tenant's template library is in the DB,
    so rendering runs in a worker thread."""
    templates = services.extras[LIBRARY_KEY].for_tenant(ctx.tenant_id)
    rendered = await anyio.to_thread.run_sync(lambda: service.render(services, body, templates))
    return rendered, getattr(templates, "last", None)


@router.post("/v1/images/generations", response_model=ImageGenerationResponse, response_model_exclude_none=True)
async def create_image(body: ImageGenerationRequest, request: Request, services: ServicesDep, ctx: CurrentTenant,
                       tenancy: TenancyDep, response: Response) -> ImageGenerationResponse:
    started = time.monotonic()
    # Everything that can reject the request runs before quota is taken.
    rendered, template = await render_for(services, ctx, body)
    check_plan(ctx, rendered)
    llm = enhance_target(services, ctx, rendered)
    rendered = qos.stamp(rendered, ctx.plan, body.quality, explicit_steps=body.steps is not None,
                         metadata=body.metadata)
    admission = await tenancy.admit(ctx, route="images", model=rendered.model.name, images=len(rendered.tasks))
    async with admission:
        if llm is not None:
            rendered = await enhance_admitted(services, tenancy, ctx, llm, rendered)
        results = await service.run_tasks(services, rendered)
        admission.add(images=len(results), gpu_seconds=service.gpu_seconds(results))
        keys, urls = [], []
        if body.response_format == "url":
            keys = await service.store_results(services.extras[STORAGE_KEY], ctx.tenant_id, results)
            urls = [services.extras[STORAGE_KEY].url(k) for k in keys]
    generation_id = await anyio.to_thread.run_sync(lambda: services.extras[LIBRARY_KEY].log_rendered(
        ctx.tenant_id, rendered, template=template, result_keys=keys, latency_s=time.monotonic() - started))
    response.headers.update(admission.headers())
    return service.to_response(rendered, results, urls=urls or None, generation_id=generation_id)


@router.post("/v1/prompts/render")
async def render_prompt(body: PromptRenderRequest, services: ServicesDep, ctx: CurrentTenant) -> dict:
    """Dry run: what a generation request would draw, with which typed parameters."""
    rendered, template = await render_for(services, ctx, body)
    check_plan(ctx, rendered)
    return {**rendered.describe(), "template": dataclasses.asdict(template) if template else None}
