"""From an image request to its `ImageSpec` (images/spec.py).

Order: template (+ its default parameters) → Midjourney parameters parsed out of the text →
JSON fields and flags merged (rules in docs/prompt-parameters.md) → size/steps checked with the
diffusion contract's rules (deployments/diffusion/rules.py, the ones the engine applies too) and
the model's limits → one seed and guidance per image.
"""

from __future__ import annotations

import secrets
from typing import Protocol

from deployments.diffusion.rules import SEED_MAX, SizeRules
from serve_app.config import AppConfig, DiffusionModelConfig
from serve_app.errors import APIError, bad_request, not_found, unprocessable
from serve_app.images.protocol import ImageGenerationRequest, PromptRenderRequest
from serve_app.images.spec import ImageSpec
from serve_app.library.templates import ResolvedTemplate
from serve_app.prompts import mapping
from serve_app.prompts.params import LoraParam, ParsedPrompt, PromptParameterError, PromptParams, parse_prompt
from serve_app.prompts.templates import MissingVariableError, fill

ImageRequest = ImageGenerationRequest | PromptRenderRequest


class TemplateSource(Protocol):
    """Where named templates come from: the tenant's library (`library.TenantTemplates`) or the
    config (`ConfigTemplates`)."""

    def get(self, name: str, version: int | None = None) -> ResolvedTemplate | None:
        """The template, or None when unknown."""


class ConfigTemplates:
    def __init__(self, config: AppConfig) -> None:
        self._by_name = {t.name: t for t in config.templates}

    def get(self, name: str, version: int | None = None) -> ResolvedTemplate | None:
        t = self._by_name.get(name)
        if t is None or version not in (None, 1):
            return None
        return ResolvedTemplate(name=t.name, version=1, template=t.template, defaults=t.defaults, source="config")


def _parse(text: str) -> ParsedPrompt:
    try:
        return parse_prompt(text)
    except PromptParameterError as e:
        raise unprocessable(e.message, param=e.param, code="invalid_prompt_parameter") from None


def _merge_params(defaults: PromptParams, user: PromptParams) -> PromptParams:
    """The user's flags win; the template's fill the ones the user didn't give; `--no` adds up."""
    unset = PromptParams()
    merged = {k: getattr(user, k) if getattr(user, k) != getattr(unset, k) else getattr(defaults, k)
              for k in PromptParams.model_fields}
    merged["negative"] = tuple(dict.fromkeys((*defaults.negative, *user.negative)))
    merged["loras"] = merge_loras(defaults.loras, user.loras)
    return PromptParams(**merged)


def merge_loras(first: tuple[LoraParam, ...], then: tuple[LoraParam, ...]) -> tuple[LoraParam, ...]:
    """LoRA adapters add up (template, prompt, the request's `loras`); a name given again takes
    the later weight."""
    out = {lora.name: lora for lora in first}
    out.update({lora.name: lora for lora in then})
    return tuple(out.values())


# OpenAI's `style` as default prompt parameters (applied under the template's and the prompt's).
STYLE_PARAMS: dict[str, PromptParams] = {"vivid": PromptParams(stylize=250), "natural": PromptParams()}


def _parse_with_template(prompt: str, template: str | None, version: int | None, variables: dict[str, str],
                         templates: TemplateSource) -> tuple[ParsedPrompt, ResolvedTemplate | None]:
    user = _parse(prompt)
    if template is None:
        return user, None
    found = templates.get(template, version)
    if found is None:
        suffix = f" version {version}" if version else ""
        raise not_found(f"Template {template!r}{suffix} does not exist.", param="template",
                        code="template_not_found")
    text, defaults = found.template, found.defaults
    # The user's text (flags removed) is available to the template as {prompt}.
    try:
        filled = fill(text, {"prompt": user.text, **variables})
    except MissingVariableError as e:
        raise unprocessable(f"Template {template!r} needs variable {e.name!r}.",
                            param=f"variables.{e.name}", code="missing_variable") from None
    drawn = _parse(filled)
    default_params = _merge_params(_parse(f"x {defaults}").params, drawn.params) if defaults else drawn.params
    return ParsedPrompt(text=drawn.text, segments=drawn.segments,
                        params=_merge_params(default_params, user.params)), found


# Families whose diffusers pipeline can start from an image (img2img, inpainting, IP-Adapter).
IMAGE_INPUT_FAMILIES = frozenset({"sdxl"})


def _resolve_model(config: AppConfig, requested: str | None, flag: str | None,
                   image_param: str | None = None) -> DiffusionModelConfig:
    """The model by `--model`/`--v`, `model` or the default. A request with input images
    (`image_param` names where they came from) needs an img2img-capable family: a model named
    explicitly that can't is a 422 naming both; with no model named, the first capable model is
    used instead of a default that can't (docs/api-images.md)."""
    name = flag or requested or config.image_model_default
    model = config.find_diffusion(name)
    param = "--model" if flag else "model"
    if model is None:
        if config.find_llm(name) is not None:
            raise bad_request(f"Model {name!r} is a chat model, not an image model.", param=param,
                              code="model_not_image")
        raise not_found(f"The model {name!r} does not exist.", param=param, code="model_not_found")
    if image_param is None or model.family in IMAGE_INPUT_FAMILIES:
        return model
    capable = next((m for m in config.diffusion_models if m.family in IMAGE_INPUT_FAMILIES), None)
    if flag is None and requested is None and capable is not None:
        return capable
    raise unprocessable(f"{image_param}: model {model.name!r} ({model.family}) can't start from or refer to an "
                        f"image; use an SDXL-family model"
                        + (f" such as {capable.name!r}" if capable else "") + f" (or leave `{param}` out).",
                        param=image_param, code="model_without_image_input")


def image_param_of(params: PromptParams) -> str | None:
    """Which prompt parameter brings input images, if any (for errors naming it)."""
    if params.image_prompts:
        return "prompt"
    for param, present in (("--sref", params.style_refs), ("--cref", params.character_refs),
                           ("--oref", params.omni_ref)):
        if present:
            return param
    return None


def _validate_size(model: DiffusionModelConfig, width: int, height: int) -> None:
    try:  # the contract's rules, the same the model's replicas check
        SizeRules(model.size_multiple, model.min_side, model.max_side).check(width, height, model=model.name)
    except ValueError as e:
        raise bad_request(str(e), param="size", code="invalid_size") from None
    if width * height / 1e6 > model.batch_megapixels:
        # Larger than a whole batch of this model's replica may hold: it would not fit its GPU share.
        raise unprocessable(f"A {width}x{height} image needs more GPU memory than a replica of model {model.name!r} "
                            f"may use ({model.batch_megapixels:g} megapixels per batch); ask for a smaller size.",
                            param="size", code="exceeds_memory_budget")


def _size_of(req: ImageRequest) -> tuple[int, int] | None:
    try:
        return req.parsed_size()
    except ValueError as e:
        raise bad_request(str(e), param="size", code="invalid_size") from None


def render_image_request(config: AppConfig, templates: TemplateSource, req: ImageRequest, *,
                         tenant: str | None = None, image_param: str | None = None) -> ImageSpec:
    """The request's `ImageSpec`, or the APIError (400/404/422) naming what is wrong. Blocking when
    `templates` reads the database: run it in a worker thread. `image_param`: the request sends an
    image to start from (edits: `image`); images named in the prompt are found here. The images
    themselves are loaded afterwards (images/conditioning.py)."""
    n, prompt, style = req.n, req.prompt, req.style
    if n > config.limits.max_images_per_request:
        raise bad_request(f"n is {n}; the limit is {config.limits.max_images_per_request} images per request.",
                          param="n", code="too_many_images")
    if len(prompt) > config.limits.max_prompt_chars:
        raise bad_request(f"prompt is {len(prompt)} characters; the limit is {config.limits.max_prompt_chars}.",
                          param="prompt", code="prompt_too_long")
    size = _size_of(req)
    parsed, template = _parse_with_template(prompt, req.template, req.template_version, req.variables, templates)
    if style is not None:
        if style not in STYLE_PARAMS:
            raise bad_request(f"style must be one of {sorted(STYLE_PARAMS)}, got {style!r}.", param="style")
        parsed = parsed.model_copy(update={"params": _merge_params(STYLE_PARAMS[style], parsed.params)})
    body_loras = tuple(LoraParam(name=x.name, weight=x.weight) for x in getattr(req, "loras", None) or ())
    if body_loras:
        parsed = parsed.model_copy(update={"params": parsed.params.model_copy(
            update={"loras": merge_loras(parsed.params.loras, body_loras)})})
    p = parsed.params
    starts_from_image = image_param is not None or bool(p.image_prompts)
    image_param = image_param or image_param_of(p)
    if not parsed.text.strip() and not starts_from_image:  # img2img may run from the image alone
        raise bad_request("prompt has no text besides its parameters.", param="prompt", code="empty_prompt")
    mdl = _resolve_model(config, req.model, p.model, image_param)
    if p.loras and not mdl.serves_loras:
        raise bad_request(f"Model {mdl.name!r} does not take LoRA adapters.", param="loras", code="loras_unsupported")
    if len(p.loras) > mdl.lora.max_adapters_per_replica:
        raise bad_request(f"{len(p.loras)} LoRA adapters asked; model {mdl.name!r} takes at most "
                          f"{mdl.lora.max_adapters_per_replica} per image.", param="loras", code="too_many_loras")

    try:
        settings = mapping.resolve_images(
            p, mapping.ModelDefaults(native_side=mdl.native_resolution, multiple=mdl.size_multiple,
                                     steps=mdl.default_steps, guidance=mdl.default_guidance,
                                     max_side=mdl.max_side),
            n=n, seed=req.seed if req.seed is not None else secrets.randbelow(SEED_MAX + 1), size=size, steps=req.steps,
            guidance_scale=req.guidance_scale, negative=req.negative_prompt)
    except ValueError as e:
        raise bad_request(str(e)) from None
    _validate_size(mdl, settings.width, settings.height)
    if settings.steps > mdl.max_steps:
        param = "--q" if p.quality is not None else "steps"
        raise bad_request(f"steps ({settings.steps}) exceed the limit of {mdl.max_steps} for model {mdl.name!r}.",
                          param=param, code="too_many_steps")
    weighted = parsed.segments if len(parsed.segments) > 1 else ()
    enhance = getattr(req, "enhance", False) or p.enhance
    partial_images = getattr(req, "partial_images", 0)
    if partial_images:
        _check_previews(mdl)
    return ImageSpec(**dict(settings), model=mdl.name, prompt=parsed.text, weighted_prompts=weighted, params=p,
                     enhance=enhance, template=template, tenant=tenant, partial_images=partial_images)


def _check_previews(model: DiffusionModelConfig) -> None:
    """422 when the model can't draw partial images: Würstchen's latents (its prior's image
    embeddings, then Paella VQ latents) are not SD latents, so no tiny VAE previews them; an SDXL
    model needs `previews.vae` in its config."""
    if model.family == "wuerstchen":
        why = "its Würstchen latents have no preview decoder"
    elif model.previews is None:
        why = "its config names no preview decoder (`previews.vae`)"
    else:
        return
    raise unprocessable(f"Model {model.name!r} can't stream partial images: {why}. Ask with partial_images 0 "
                        "or another model.", param="partial_images", code="partial_images_unsupported")


__all__ = ["APIError", "ConfigTemplates", "ImageRequest", "TemplateSource", "render_image_request"]
