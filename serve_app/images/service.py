"""The image use case's one owner: `ImagesService`, built once per ingress replica.

`prepare` does everything that can refuse a request before quota is taken (render, plan check,
the `enhance` model's plan check, quality of service); `generate` does the rest inside the
request's admission (prompt expansion, the images on the model's diffusion replicas, storage, the
generation log). `POST /v1/images/generations` calls both; `/v1/jobs` calls `prepare` and
`enhance` when a job is submitted, and its runner `run` and `deliver` (jobs/service.py).

`enhance`: the chat model (`enhance_model`, else the first LLM) is resolved and checked against the
plan in `prepare` (403 before any quota). The expansion then runs under an admission of its own
(route `enhance`): its tokens are held from the token window and budget up front and recorded in
the ledger like a chat request's; it takes no second request unit or concurrency slot.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import anyio
from PIL import Image

from deployments.diffusion.rules import SizeRules
from deployments.diffusion.types import ImageResult, ImageTask, InputImage, PartialImage
from serve_app.chat.enhance import SYSTEM_PROMPT, expand_with
from serve_app.chat.service import LLMTarget
from serve_app.errors import APIError, bad_request, is_backend_at_capacity, unavailable, unprocessable
from serve_app.images import qos
from serve_app.images.conditioning import Conditioning, SentImages
from serve_app.images.inputs import InputRefused
from serve_app.images.protocol import (
    GenerationInfo,
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    PromptRenderRequest,
)
from serve_app.images.render import render_image_request
from serve_app.images.spec import ImageSpec, LoraRef
from serve_app.prompts.mapping import size_for_aspect
from serve_app.storage import StorageError, result_key
from serve_app.tenancy import TenantContext, ensure_model_allowed, ensure_within_plan
from telemetry import tracing

if TYPE_CHECKING:
    from serve_app.adapters.registry import AdapterRegistry
    from serve_app.config import AppConfig
    from serve_app.library import Library
    from serve_app.storage import ResultStore
    from serve_app.tenancy import Admission, Tenancy

ENHANCE_ROUTE = "enhance"
ENHANCE_MAX_TOKENS = 77  # CLIP's window: more expanded prompt than this is cut off by the text encoder
OnProgress = Callable[[float], Awaitable[None]]  # fraction of the request's denoising steps done
OnPreview = Callable[[int, PartialImage], Awaitable[None]]  # (image index, its latest partial image)


@dataclass(frozen=True)
class PreparedImages:
    """A request that passed every check: its spec, who asked, and the chat model that will expand
    its prompt (None when it asks for no expansion, or once expanded)."""

    spec: ImageSpec
    tenant: TenantContext
    enhance_with: LLMTarget | None = None
    started: float = field(default_factory=time.monotonic)
    images: dict[str, InputImage] = field(default_factory=dict, repr=False)  # input images by sha256


class ImagesService:
    def __init__(self, *, config: AppConfig, diffusion: Mapping[str, Any], tenancy: Tenancy, library: Library,
                 storage: ResultStore, resolve_llm: Callable[[str | None], LLMTarget],
                 conditioning: Conditioning | None = None, adapters: AdapterRegistry | None = None) -> None:
        self.config = config
        self.diffusion = diffusion  # Serve DeploymentHandles by model name
        self.tenancy = tenancy
        self.library = library
        self.storage = storage
        self.resolve_llm = resolve_llm  # chat.service.resolve_llm over this replica's LLM handles
        self.conditioning = conditioning  # input images (image prompts, references, edits); None: refused
        self.adapters = adapters  # the LoRA registry (serve_app/adapters)

    # -- before quota -----------------------------------------------------------------------------

    async def render(self, body: ImageGenerationRequest | PromptRenderRequest, ctx: TenantContext, *,
                     image_param: str | None = None) -> ImageSpec:
        """The request's spec within the tenant's plan. The tenant's templates are in the database,
        so rendering runs in a worker thread. `image_param`: the request sends an image (edits)."""
        templates = self.library.for_tenant(ctx.tenant_id)
        spec = await anyio.to_thread.run_sync(
            lambda: self._resolve_loras(render_image_request(self.config, templates, body, tenant=ctx.tenant,
                                                             image_param=image_param), ctx))
        ensure_model_allowed(ctx, spec.model, self.config.find_diffusion(spec.model).aliases)  # type: ignore[union-attr]
        ensure_within_plan(ctx, width=spec.width, height=spec.height, steps=spec.steps)
        return spec

    def _resolve_loras(self, spec: ImageSpec, ctx: TenantContext) -> ImageSpec:
        """Names of adapters -> the tenant's visible registry ids (404 for one it can't see), before
        any quota or GPU work. Blocking (database)."""
        if not spec.params.loras:
            return spec
        if self.adapters is None:
            raise bad_request("LoRA adapters are not enabled on this server.", param="loras", code="loras_unsupported")
        refs = []
        for i, lora in enumerate(spec.params.loras):
            a = self.adapters.resolve(ctx.tenant_id, "diffusion", lora.name, allow_global=ctx.plan.global_adapters,
                                      base_model=spec.model, param=f"loras[{i}].name")
            refs.append(LoraRef(name=a.name, adapter_id=a.id, weight=lora.weight))
        if len({r.adapter_id for r in refs}) != len(refs):
            raise bad_request("loras names one adapter twice (by name and id?).", param="loras",
                              code="duplicate_lora")
        return spec.model_copy(update={"loras": tuple(refs)})

    async def prepare(self, body: ImageGenerationRequest, ctx: TenantContext,
                      sent: SentImages | None = None) -> PreparedImages:
        """`sent`: the images of an edit or a variation. Input images are fetched and checked
        here, after the plan checks and before any quota is taken."""
        spec = await self.render(body, ctx, image_param=sent.images[0].param if sent else None)
        target = self._enhance_target(ctx) if spec.enhance else None
        spec, images = await self.attach_images(spec, ctx.tenant_id, sent)
        if spec.init_image is not None and body.parsed_size() is None and spec.params.aspect_ratio is None:
            spec = self._size_of_image(spec, images[spec.init_image.sha256])
            ensure_within_plan(ctx, width=spec.width, height=spec.height, steps=spec.steps)
        model = self.config.find_diffusion(spec.model)
        spec = qos.stamp(spec, ctx.plan, body.quality, explicit_steps=body.steps is not None, metadata=body.metadata,
                         has_draft_tier=model is not None and model.has_draft_tier)
        return PreparedImages(spec, ctx, target, images=images)

    async def attach_images(self, spec: ImageSpec, tenant_id: int,
                            sent: SentImages | None) -> tuple[ImageSpec, dict[str, InputImage]]:
        if sent is None and not spec.params.image_sources:
            return spec, {}
        if self.conditioning is None:
            raise bad_request("This server takes no input images.", param=sent.images[0].param if sent else "prompt",
                              code="input_images_disabled")
        self._check_references(spec, sent)  # before anything is fetched
        spec, images = await self.conditioning.attach(spec, tenant_id=tenant_id, sent=sent)  # InputRefused: 4xx
        if spec.init_image is not None and img2img_steps(spec.steps, spec.strength) < 1:
            param = "strength" if sent is not None and sent.strength is not None else (
                "--iw" if spec.params.image_weight is not None else "steps")
            raise unprocessable(f"strength {spec.strength:g} of {spec.steps} steps leaves no step to run on the image "
                                "(img2img runs the last int(steps x strength)); lower --iw or ask for more steps.",
                                param=param, code="no_steps_left")
        return spec, images

    def _check_references(self, spec: ImageSpec, sent: SentImages | None) -> None:
        """References draw through the model's IP-Adapter: a model without one refuses them (422)."""
        p = spec.params
        param = "--sref" if p.style_refs else "--cref" if p.character_refs else "--oref" if p.omni_ref else None
        if param is None and sent is not None and len(sent.images) > 1:
            param = sent.images[1].param
        model = self.config.find_diffusion(spec.model)
        if param is not None and model is not None and model.ip_adapter is None:
            raise unprocessable(f"{param}: model {model.name!r} has no IP-Adapter configured, so it can't draw style "
                                "or character references.", param=param, code="references_unsupported")

    def _size_of_image(self, spec: ImageSpec, image: InputImage) -> ImageSpec:
        """No `size` and no `--ar`: draw at the init image's aspect ratio (clamped to --ar's 1:4..4:1)
        with the model's native pixel count, as `--ar` would; a square image changes nothing."""
        model = self.config.find_diffusion(spec.model)
        with Image.open(io.BytesIO(image.png)) as im:
            w, h = im.size
        ratio = min(4.0, max(0.25, w / h))
        if model is None or abs(ratio - 1.0) < 1e-3:
            return spec
        aspect = (round(ratio * 1000), 1000)
        width, height = size_for_aspect(aspect, model.native_resolution ** 2, model.size_multiple, model.max_side)
        try:
            SizeRules(model.size_multiple, model.min_side, model.max_side).check(width, height)
        except ValueError:
            return spec  # an extreme ratio this model can't draw: keep its native square
        return spec.model_copy(update={"width": width, "height": height})

    async def load_images(self, spec: ImageSpec, tenant_id: int) -> dict[str, InputImage]:
        """A stored spec's input images again (a job's attempt); InputRefused (a ValueError: the job
        fails with the reason, no retry) when one is gone or changed."""
        if not spec.image_refs:
            return {}
        if self.conditioning is None:
            raise InputRefused(422, "This server takes no input images.", param="prompt", code="input_images_disabled")
        return await self.conditioning.load(spec, tenant_id=tenant_id)

    def _enhance_target(self, ctx: TenantContext) -> LLMTarget:
        """404/503 when no chat model is configured or deployed, 403 when the plan excludes it."""
        cfg = self.config.enhance_llm
        target = self.resolve_llm(cfg.name if cfg is not None else None)
        ensure_model_allowed(ctx, target.name, self.config.find_llm(target.name).aliases)  # type: ignore[union-attr]
        return target

    # -- inside the request's admission -----------------------------------------------------------

    async def enhance(self, prepared: PreparedImages) -> PreparedImages:
        """The prompt expanded by the chat model, its tokens admitted and metered (429 when the token
        window or budget can't take them); unchanged when no expansion was asked."""
        target = prepared.enhance_with
        if target is None:
            return prepared
        spec = prepared.spec
        est = (len(SYSTEM_PROMPT) + len(spec.prompt)) // 3 + 1 + ENHANCE_MAX_TOKENS  # corrected at settle
        admission = await self.tenancy.admit(prepared.tenant, route=ENHANCE_ROUTE, model=target.name, est_tokens=est,
                                             within_request=True)
        async with admission:
            exp = await expand_with(target, spec.prompt, max_tokens=ENHANCE_MAX_TOKENS, seed=spec.seeds[0])
            admission.add(prompt_tokens=exp.prompt_tokens, completion_tokens=exp.completion_tokens,
                          gpu_seconds=exp.gpu_seconds)
        # Sizes, seeds and other parameters stay as rendered; the expansion is drawn as one piece.
        spec = spec.model_copy(update={"prompt": exp.text, "asked_prompt": spec.prompt, "weighted_prompts": (),
                                       "enhance": False})
        return replace(prepared, spec=spec, enhance_with=None)

    async def generate(self, prepared: PreparedImages, admission: Admission, *,
                       urls: bool) -> ImageGenerationResponse:
        """Expand, draw, meter into `admission`, store (when `urls`), log; the OpenAI-shaped answer."""
        prepared = await self.enhance(prepared)
        spec = prepared.spec
        try:
            results = await self.run(spec, images=prepared.images)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped to the client-facing error
            raise map_backend_error(e, spec.model) from None
        admission.add(images=len(results), gpu_seconds=gpu_seconds(results))
        try:
            keys, generation_id = await self.deliver(spec, results, tenant_id=prepared.tenant.tenant_id, store=urls,
                                                     latency_s=time.monotonic() - prepared.started)
        except StorageError as e:
            raise unavailable(f"Could not store the images: {e.reason}", code="storage_failed") from None
        return to_response(spec, results, [self.storage.url(k) for k in keys] if urls else None, generation_id)

    # -- the steps a job runs too -----------------------------------------------------------------

    def handle_for(self, spec: ImageSpec) -> Any:
        """The model's deployment handle (503 if none runs); with adapters, Serve routes the call by
        the adapter set to replicas that already hold it (multiplexing)."""
        handle = self.diffusion.get(spec.model)
        if handle is None:
            raise unavailable(f"Model {spec.model!r} has no running deployment.")
        return handle.options(multiplexed_model_id=spec.adapter_set) if spec.loras else handle

    async def run(self, spec: ImageSpec, *, task_ids: list[str] | None = None,
                  on_progress: OnProgress | None = None, on_preview: OnPreview | None = None,
                  images: dict[str, InputImage] | None = None) -> list[ImageResult]:
        """All images of `spec`, in order; each its own Serve request, so batches mix users. With
        `on_progress`, each image streams its steps (a job's progress) and leaving cancels its call.
        Errors are raised as the handle raised them (a job decides from them: retry or fail)."""
        handle = self.handle_for(spec)
        with tracing.span("diffusion.call", kind=tracing.SpanKind.CLIENT, model=spec.model, images=spec.n):
            tasks = spec.tasks(task_ids, trace_context=tracing.outgoing(), images=images)
            if on_progress is None:
                return list(await asyncio.gather(*(handle.generate.remote(t) for t in tasks)))
            return await _streamed(handle, tasks, on_progress, on_preview)

    async def deliver(self, spec: ImageSpec, results: list[ImageResult], *, tenant_id: int, store: bool = True,
                      latency_s: float | None = None, job_id: str | None = None) -> tuple[list[str], str]:
        """(result keys, generation id): upload the PNGs (retried by the store; StorageError after
        that), then log the generation."""
        keys = [await self.storage.aput(result_key(tenant_id), r.png, "image/png") for r in results] if store else []
        generation_id = await anyio.to_thread.run_sync(lambda: self.library.generations.log_spec(
            tenant_id, spec, seeds=[r.seed for r in results], result_keys=keys, latency_s=latency_s, job_id=job_id))
        return keys, generation_id


async def _streamed(handle: Any, tasks: tuple[ImageTask, ...], on_progress: OnProgress,
                    on_preview: OnPreview | None = None) -> list[ImageResult]:
    steps = [0.0] * len(tasks)

    async def one(i: int, task: ImageTask) -> ImageResult:
        result: ImageResult | None = None
        stream = handle.options(stream=True).generate_stream.remote(task)
        try:
            async for event in stream:
                if isinstance(event, dict):
                    steps[i] = event["step"] / max(1, event["total"])
                    await on_progress(sum(steps) / len(steps))
                elif isinstance(event, PartialImage):
                    if on_preview is not None:
                        await on_preview(i, event)
                else:
                    result = event
        except asyncio.CancelledError:
            # Leaving the loop does not cancel the Serve call: without this the replica would
            # denoise (and the job finish) every image of a cancelled job.
            stream.cancel()
            raise
        if result is None:
            raise RuntimeError("the diffusion stream ended without an image")
        return result

    # A TaskGroup, not gather: one image failing or the job being cancelled cancels the other calls.
    try:
        async with asyncio.TaskGroup() as group:
            calls = [group.create_task(one(i, t)) for i, t in enumerate(tasks)]
    except BaseExceptionGroup as failed:  # the first failure decides: retry later, retry, or fail
        raise failed.exceptions[0] from None
    return [c.result() for c in calls]


def img2img_steps(steps: int, strength: float) -> int:
    """Steps an img2img call runs: the engine's rule (deployments/diffusion/img2img.steps_run, which
    imports diffusers: not on the ingress)."""
    return min(int(steps * strength), steps)


def map_backend_error(exc: Exception, model: str) -> APIError:
    """Serve's backpressure and replica failures become 503 + Retry-After, never a traceback."""
    if is_backend_at_capacity(exc):
        return unavailable(f"Model {model!r} is at capacity; retry later.", retry_after_s=2,
                           code="at_capacity")
    # A replica's ValueError arrives as Ray's RayTaskError, itself a ValueError whose text is the
    # traceback: answer with the original's message (and its `code`/`param` when it has them,
    # e.g. deployments.adapters.AdapterIncompatible).
    cause = getattr(exc, "cause", None)
    refused = cause if isinstance(cause, ValueError) else exc if isinstance(exc, ValueError) else None
    if refused is not None:
        code, param = getattr(refused, "code", None), getattr(refused, "param", None)
        return bad_request(str(refused), param=param if isinstance(param, str) else None,
                           code=code if isinstance(code, str) else "invalid_value")
    return unavailable(f"Model {model!r} failed to generate ({type(exc).__name__}); retry later.", retry_after_s=2,
                       code="generation_failed")


def gpu_seconds(results: list[ImageResult]) -> float:
    """Each image's share of its batch's compute time × the share of the GPU its replica holds
    (what a GPU-second price bills)."""
    return sum(r.compute_s / max(1, r.batch_size) * r.gpu_share for r in results)


def degradation(results: list[ImageResult]) -> tuple[bool, str | None]:
    """(whether some image ran with fewer steps than asked, why: e.g. `load`)."""
    degraded = [r for r in results if r.degraded]
    return bool(degraded), degraded[0].degrade_reason if degraded else None


def to_response(spec: ImageSpec, results: list[ImageResult], urls: list[str] | None,
                generation_id: str | None) -> ImageGenerationResponse:
    if urls is not None:
        data = [ImageData(url=u, revised_prompt=spec.prompt, seed=r.seed) for u, r in zip(urls, results, strict=False)]
    else:
        data = [ImageData(b64_json=base64.b64encode(r.png).decode("ascii"), revised_prompt=spec.prompt,
                          seed=r.seed) for r in results]
    degraded, reason = degradation(results)
    info = GenerationInfo(model=spec.model, width=spec.width, height=spec.height,
                          steps=results[0].steps if results else spec.steps,
                          guidance_scale=spec.guidance_scales[0], negative_prompt=spec.negative_prompt,
                          tile=spec.tile, batch_sizes=[r.batch_size for r in results],
                          queue_wait_s=[round(r.queue_wait_s, 4) for r in results],
                          compute_s=[round(r.compute_s, 4) for r in results],
                          generation_id=generation_id, steps_used=[r.steps for r in results],
                          degraded=degraded, reason=reason, quality=[r.quality for r in results],
                          loras=[{"name": r.name, "id": r.adapter_id, "weight": r.weight} for r in spec.loras])
    return ImageGenerationResponse(created=int(time.time()), data=data, genserve=info)
