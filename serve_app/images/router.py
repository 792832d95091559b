"""Thin HTTP layer of image generation, edits and variations: admission and headers around `ImagesService`."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from serve_app.images.conditioning import SentImages
from serve_app.images.edits import edit_form, variation_form
from serve_app.images.protocol import ImageGenerationRequest, ImageGenerationResponse, PromptRenderRequest
from serve_app.images.service import ImagesService
from serve_app.images.streaming import Kind, check_request, stream_images
from serve_app.state import ServicesDep
from serve_app.tenancy import CurrentTenant, Tenancy, TenancyDep, TenantContext

router = APIRouter(tags=["images"])


async def get_images(services: ServicesDep) -> ImagesService:
    if services.images is None:
        raise RuntimeError("services.images is not set: the ingress must build an ImagesService")
    return services.images


ImagesDep = Annotated[ImagesService, Depends(get_images)]


@router.post("/v1/images/generations", response_model=ImageGenerationResponse, response_model_exclude_none=True)
async def create_image(body: ImageGenerationRequest, images: ImagesDep, ctx: CurrentTenant, tenancy: TenancyDep,
                       response: Response) -> ImageGenerationResponse | StreamingResponse:
    check_request(body)
    return await _generate(body, None, images, ctx, tenancy, response)


@router.post("/v1/prompts/render")
async def render_prompt(body: PromptRenderRequest, images: ImagesDep, ctx: CurrentTenant) -> dict[str, Any]:
    """Dry run: what a generation request would draw, with which typed parameters."""
    spec = await images.render(body, ctx)
    return {**spec.describe(), "template": dataclasses.asdict(spec.template) if spec.template else None}


async def _generate(body: ImageGenerationRequest, sent: SentImages | None, images: ImagesService,
                    ctx: TenantContext, tenancy: Tenancy, response: Response,
                    kind: Kind = "image_generation") -> ImageGenerationResponse | StreamingResponse:
    prepared = await images.prepare(body, ctx, sent)  # everything that can refuse it runs before quota is taken
    admission = await tenancy.admit(ctx, route="images", model=prepared.spec.model, images=prepared.spec.n)
    if body.stream:  # SSE: partial images, then each image (images/streaming.py); `kind` names the events
        return await stream_images(images, prepared, admission, kind=kind, quality=body.quality)
    async with admission:
        answer = await images.generate(prepared, admission, urls=body.response_format == "url")
    response.headers.update(admission.headers())
    return answer


@router.post("/v1/images/edits", response_model=ImageGenerationResponse, response_model_exclude_none=True)
async def edit_image(request: Request, images: ImagesDep, ctx: CurrentTenant, tenancy: TenancyDep,
                     response: Response) -> ImageGenerationResponse | StreamingResponse:
    """OpenAI's edits (multipart): img2img from `image`, inpainting with `mask` (docs/api-images.md)."""
    body, sent = await edit_form(await request.form())
    check_request(body, route="/v1/images/edits")
    return await _generate(body, sent, images, ctx, tenancy, response, kind="image_edit")


@router.post("/v1/images/variations", response_model=ImageGenerationResponse, response_model_exclude_none=True)
async def create_variation(request: Request, images: ImagesDep, ctx: CurrentTenant, tenancy: TenancyDep,
                           response: Response) -> ImageGenerationResponse | StreamingResponse:
    """OpenAI's variations (multipart): img2img from `image`, empty prompt, a fixed strength; no `stream`."""
    body, sent = await variation_form(await request.form(), images.config.image_inputs.variation_strength)
    return await _generate(body, sent, images, ctx, tenancy, response)
