"""Thin HTTP layer of image generation: auth and quota around `images.service`."""

from __future__ import annotations

from fastapi import APIRouter, Response

from serve_app.errors import bad_request
from serve_app.images import service
from serve_app.images.protocol import ImageGenerationRequest, ImageGenerationResponse, PromptRenderRequest
from serve_app.prompts.render import RenderedImageRequest, render_image_request
from serve_app.state import ServicesDep
from serve_app.tenancy import CurrentTenant, TenancyDep, TenantContext, ensure_model_allowed, ensure_within_plan

router = APIRouter(tags=["images"])


def check_plan(ctx: TenantContext, rendered: RenderedImageRequest) -> None:
    ensure_model_allowed(ctx, rendered.model.name, rendered.model.aliases)
    first = rendered.tasks[0]
    ensure_within_plan(ctx, width=first.width, height=first.height, steps=first.steps)


@router.post("/v1/images/generations", response_model=ImageGenerationResponse, response_model_exclude_none=True)
async def create_image(body: ImageGenerationRequest, services: ServicesDep, ctx: CurrentTenant,
                       tenancy: TenancyDep, response: Response) -> ImageGenerationResponse:
    # Everything that can reject the request runs before quota is taken.
    service.check_response_format(body)
    rendered = service.render(services, body)
    check_plan(ctx, rendered)
    admission = await tenancy.admit(ctx, route="images", model=rendered.model.name, images=len(rendered.tasks))
    async with admission:
        if rendered.enhance:
            rendered, expansion = await service.enhance(services, rendered)
            admission.add(prompt_tokens=expansion.prompt_tokens, completion_tokens=expansion.completion_tokens)
        results = await service.run_tasks(services, rendered)
        admission.add(images=len(results), gpu_seconds=service.gpu_seconds(results))
    response.headers.update(admission.headers())
    return service.to_response(rendered, results)


@router.post("/v1/prompts/render")
async def render_prompt(body: PromptRenderRequest, services: ServicesDep, ctx: CurrentTenant) -> dict:
    """Dry run: what a generation request would draw, with which typed parameters."""
    try:
        size = body.parsed_size()
    except ValueError as e:
        raise bad_request(str(e), param="size", code="invalid_size") from None
    rendered = render_image_request(
        config=services.config, templates=services.templates, prompt=body.prompt, model=body.model, n=body.n,
        size=size, negative_prompt=body.negative_prompt, seed=body.seed, steps=body.steps,
        guidance_scale=body.guidance_scale, template=body.template, template_version=body.template_version,
        variables=body.variables)
    check_plan(ctx, rendered)
    return rendered.describe()
