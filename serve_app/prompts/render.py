"""From an image request to the per-image tasks a diffusion replica runs.

Order: template (+ its default parameters) → Midjourney parameters parsed out of the text →
JSON fields and flags merged (rules in docs/prompt-parameters.md) → size/steps/guidance
validated against the model's limits → one `ImageTask` per image (own seed each).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol

from deployments.diffusion.types import ImageTask, WeightedPrompt
from serve_app.config import AppConfig, DiffusionModelConfig
from serve_app.errors import APIError, bad_request, not_found, unprocessable
from serve_app.prompts import mapping
from serve_app.prompts.params import ParsedPrompt, PromptParameterError, PromptParams, parse_prompt
from serve_app.prompts.templates import MissingVariableError, fill


class TemplateSource(Protocol):
    """Where named templates come from (config now; the template library later)."""

    def get(self, name: str, version: int | None = None) -> tuple[str, str] | None:
        """(template text, default parameters) or None when unknown."""


class ConfigTemplates:
    def __init__(self, config: AppConfig) -> None:
        self._by_name = {t.name: t for t in config.templates}

    def get(self, name: str, version: int | None = None) -> tuple[str, str] | None:
        t = self._by_name.get(name)
        if t is None or version not in (None, 1):
            return None
        return t.template, t.defaults


@dataclass(frozen=True)
class RenderedImageRequest:
    model: DiffusionModelConfig
    prompt: str  # what is drawn (the OpenAI `revised_prompt`)
    negative_prompt: str
    parsed: ParsedPrompt
    tasks: tuple[ImageTask, ...]
    enhance: bool

    def describe(self) -> dict:
        first = self.tasks[0]
        return {
            "model": self.model.name,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": first.width,
            "height": first.height,
            "steps": first.steps,
            "guidance_scale": [t.guidance_scale for t in self.tasks],
            "seeds": [t.seed for t in self.tasks],
            "tile": first.tile,
            "weighted_prompts": [{"text": w.text, "weight": w.weight} for w in first.weighted_prompts],
            "params": self.parsed.params.model_dump(mode="json"),
        }


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
    return PromptParams(**merged)


# OpenAI's `style` as default prompt parameters (applied under the template's and the prompt's).
STYLE_PARAMS: dict[str, PromptParams] = {"vivid": PromptParams(stylize=250), "natural": PromptParams()}


def _parse_with_template(prompt: str, template: str | None, version: int | None, variables: dict[str, str],
                         templates: TemplateSource) -> ParsedPrompt:
    user = _parse(prompt)
    if template is None:
        return user
    found = templates.get(template, version)
    if found is None:
        suffix = f" version {version}" if version else ""
        raise not_found(f"Template {template!r}{suffix} does not exist.", param="template",
                        code="template_not_found")
    text, defaults = found
    # The user's text (flags removed) is available to the template as {prompt}.
    try:
        filled = fill(text, {"prompt": user.text, **variables})
    except MissingVariableError as e:
        raise unprocessable(f"Template {template!r} needs variable {e.name!r}.",
                            param=f"variables.{e.name}", code="missing_variable") from None
    drawn = _parse(filled)
    default_params = _merge_params(_parse(f"x {defaults}").params, drawn.params) if defaults else drawn.params
    return ParsedPrompt(text=drawn.text, segments=drawn.segments, params=_merge_params(default_params, user.params))


def _resolve_model(config: AppConfig, requested: str | None, flag: str | None) -> DiffusionModelConfig:
    name = flag or requested or config.image_model_default
    model = config.find_diffusion(name)
    if model is None:
        param = "--model" if flag else "model"
        if config.find_llm(name) is not None:
            raise bad_request(f"Model {name!r} is a chat model, not an image model.", param=param,
                              code="model_not_image")
        raise not_found(f"The model {name!r} does not exist.", param=param, code="model_not_found")
    return model


def _validate_size(model: DiffusionModelConfig, width: int, height: int) -> None:
    m = model.size_multiple
    if width % m or height % m:
        raise bad_request(f"`width` and `height` have to be divisible by {m} for model {model.name!r} "
                          f"but are {width} and {height}.", param="size", code="invalid_size")
    lo, hi = model.min_side, model.max_side
    if not (lo <= width <= hi and lo <= height <= hi):
        raise bad_request(f"`width` and `height` must be between {lo} and {hi} for model {model.name!r} "
                          f"but are {width} and {height}.", param="size", code="invalid_size")
    if width * height / 1e6 > model.batch_megapixels:
        # Larger than a whole batch of this model's replica may hold: it would not fit its GPU share.
        raise unprocessable(f"A {width}x{height} image needs more GPU memory than a replica of model {model.name!r} "
                            f"may use ({model.batch_megapixels:g} megapixels per batch); ask for a smaller size.",
                            param="size", code="exceeds_memory_budget")


def render_image_request(
    *,
    config: AppConfig,
    templates: TemplateSource,
    prompt: str,
    model: str | None = None,
    n: int = 1,
    size: tuple[int, int] | None = None,
    negative_prompt: str | None = None,
    seed: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    template: str | None = None,
    template_version: int | None = None,
    variables: dict[str, str] | None = None,
    enhance: bool = False,
    style: str | None = None,
) -> RenderedImageRequest:
    if n > config.limits.max_images_per_request:
        raise bad_request(f"n is {n}; the limit is {config.limits.max_images_per_request} images per request.",
                          param="n", code="too_many_images")
    if len(prompt) > config.limits.max_prompt_chars:
        raise bad_request(f"prompt is {len(prompt)} characters; the limit is {config.limits.max_prompt_chars}.",
                          param="prompt", code="prompt_too_long")
    parsed = _parse_with_template(prompt, template, template_version, variables or {}, templates)
    if style is not None:
        if style not in STYLE_PARAMS:
            raise bad_request(f"style must be one of {sorted(STYLE_PARAMS)}, got {style!r}.", param="style")
        parsed = parsed.model_copy(update={"params": _merge_params(STYLE_PARAMS[style], parsed.params)})
    p = parsed.params
    if not parsed.text.strip():
        raise bad_request("prompt has no text besides its parameters.", param="prompt", code="empty_prompt")
    mdl = _resolve_model(config, model, p.model)

    try:
        images = mapping.resolve_images(
            p, mapping.ModelDefaults(native_side=mdl.native_resolution, multiple=mdl.size_multiple,
                                     steps=mdl.default_steps, guidance=mdl.default_guidance,
                                     max_side=mdl.max_side),
            n=n, seed=seed if seed is not None else secrets.randbits(32), size=size, steps=steps,
            guidance_scale=guidance_scale, negative=negative_prompt)
    except ValueError as e:
        raise bad_request(str(e)) from None
    first = images[0]
    _validate_size(mdl, first.width, first.height)
    if first.steps > mdl.max_steps:
        param = "--q" if p.quality is not None else "steps"
        raise bad_request(f"steps ({first.steps}) exceed the limit of {mdl.max_steps} for model {mdl.name!r}.",
                          param=param, code="too_many_steps")

    weighted = tuple(WeightedPrompt(s.text, s.weight) for s in parsed.segments) if len(parsed.segments) > 1 else ()
    tasks = tuple(ImageTask(prompt=parsed.text, negative_prompt=im.negative_prompt, seed=im.seed, width=im.width,
                            height=im.height, steps=im.steps, guidance_scale=round(im.guidance_scale, 4),
                            tile=im.tile, weighted_prompts=weighted) for im in images)
    return RenderedImageRequest(model=mdl, prompt=parsed.text, negative_prompt=first.negative_prompt,
                                parsed=parsed, tasks=tasks, enhance=enhance or p.enhance)


__all__ = ["render_image_request", "RenderedImageRequest", "ConfigTemplates", "TemplateSource", "APIError"]
