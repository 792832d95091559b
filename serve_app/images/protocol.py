"""Request and response models of `POST /v1/images/generations` (OpenAI's shape + extensions)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.diffusion.rules import MAX_PARTIAL_IMAGES, SEED_MAX

_SIZE = re.compile(r"^\s*(\d{1,7})\s*[xX×]\s*(\d{1,7})\s*$")

# OpenAI's `style` (dall-e-3): its two values, mapped to prompt parameters in images/render.py.
Style = Literal["vivid", "natural"]
STYLE_DOC = ("`vivid`: a default `--s 250` (stronger guidance: more saturated, dramatic); `natural`: the "
             "model's own guidance (as when absent). A `--s` in the prompt or template wins.")


class LoraRequest(BaseModel):
    """One LoRA adapter for the image: a registered adapter's name (or id) and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    weight: float = Field(1.0, ge=-4.0, le=4.0, allow_inf_nan=False)


class ImageGenerationRequest(BaseModel):
    # Unknown fields are errors: a typo ("step") must not silently do nothing.
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, description="Images to generate; at most the config's `limits.max_images_per_request`.")
    size: str | None = Field(None, description="`WxH`, e.g. `1024x1024`; `auto` = model native.")
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = Field(None, max_length=256)
    # OpenAI's field: `draft` runs the model's draft tier, `auto` opts in to adaptive quality; other
    # values (OpenAI's `standard`, `hd`, `low`...) are accepted for client compatibility and mean the default.
    quality: str | None = Field(None, max_length=32)
    style: Style | None = Field(None, description=STYLE_DOC)
    stream: bool = Field(False, description="Server-sent events: `image_generation.partial_image` previews, then "
                         "`image_generation.completed` per image (`image_edit.*` on edits; docs/streaming-images.md).")
    partial_images: int = Field(0, ge=0, le=MAX_PARTIAL_IMAGES, description="Previews per image while it "
                                "denoises (0-3; may be fewer on short step counts): streamed with `stream`, and "
                                "the latest one at `GET /v1/jobs/{id}/preview` for jobs.")
    # genserve extensions
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    steps: int | None = Field(None, ge=1, le=500)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, allow_inf_nan=False)
    template: str | None = Field(None, max_length=128)
    template_version: int | None = Field(None, ge=1)
    variables: dict[str, str] = Field(default_factory=dict)
    enhance: bool = False
    loras: list[LoraRequest] = Field(default_factory=list, max_length=8, description="LoRA adapters "
                                     "(`/v1/adapters`) with weights; also `<lora:name:0.8>` in the prompt.")
    metadata: bool | None = Field(
        None, description="Embed prompt, negative prompt, seed and settings in the PNG as text chunks (anyone "
        "holding the image or its URL can read them). Default: the plan's `png_metadata` (off unless the "
        "operator turned it on).")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be empty")
        return v

    def parsed_size(self) -> tuple[int, int] | None:
        """(width, height), None for model default. Raises ValueError on a malformed size."""
        if self.size is None or self.size.strip().lower() == "auto":
            return None
        m = _SIZE.match(self.size)
        if not m:
            raise ValueError(f"size must look like `WIDTHxHEIGHT` (e.g. 1024x1024), got {self.size!r}")
        return int(m.group(1)), int(m.group(2))


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int | None = None


class GenerationInfo(BaseModel):
    """What was actually used: model, size, steps, guidance (after prompt parameters)."""

    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    negative_prompt: str
    tile: bool
    batch_sizes: list[int]
    queue_wait_s: list[float] = Field(default_factory=list, description="Per image: waiting in the replica's batch queue.")
    compute_s: list[float] = Field(default_factory=list, description="Per image: its batch's denoise+decode time.")
    generation_id: str | None = Field(None, description="Rate it at POST /v1/generations/{id}/rating.")
    steps_used: list[int] = Field(default_factory=list, description="Per image: steps actually run.")
    degraded: bool = Field(False, description="Some image ran with fewer steps than asked (adaptive quality).")
    reason: str | None = Field(None, description="Why it was degraded, e.g. `load`.")
    quality: list[str] = Field(default_factory=list, description="Per image: `default` or `draft` (the tier it ran on).")
    loras: list[dict[str, str | float]] = Field(default_factory=list, description="LoRA adapters used: name, id, "
                                                "weight.")


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    genserve: GenerationInfo | None = None


class PromptRenderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    style: Style | None = Field(None, description=STYLE_DOC)
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    steps: int | None = Field(None, ge=1, le=500)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, allow_inf_nan=False)
    template: str | None = Field(None, max_length=128)
    template_version: int | None = Field(None, ge=1)
    variables: dict[str, str] = Field(default_factory=dict)
    loras: list[LoraRequest] = Field(default_factory=list, max_length=8)

    def parsed_size(self) -> tuple[int, int] | None:
        return ImageGenerationRequest.parsed_size(self)  # type: ignore[arg-type]
