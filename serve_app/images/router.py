from __future__ import annotations

from fastapi import APIRouter

from serve_app.images import service
from serve_app.images.protocol import ImageGenerationRequest, ImageGenerationResponse, PromptRenderRequest
from serve_app.prompts.render import render_image_request
from serve_app.errors import bad_request
from serve_app.state import ServicesDep

router = APIRouter(tags=["images"])


@router.post("/v1/images/generations", response_model=ImageGenerationResponse, response_model_exclude_none=True)
async def create_image(body: ImageGenerationRequest, services: ServicesDep) -> ImageGenerationResponse:
    return await service.generate(services, body)


@router.post("/v1/prompts/render")
async def render_prompt(body: PromptRenderRequest, services: ServicesDep) -> dict:
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
    return rendered.describe()
