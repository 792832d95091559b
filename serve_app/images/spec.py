"""`ImageSpec`: one image request after rendering — the single typed, serialisable form of it.

What the replicas draw comes from it (`tasks()`), a job stores it and re-runs from it (`jobs.spec`),
the generation log and `Job.params` show it (`describe()`). A request takes three shapes on its way:
the HTTP body (`images.protocol`), the parsed prompt (`prompts.params.ParsedPrompt`), this spec; the
diffusion contract's `ImageTask` is the per-image wire form a replica takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.diffusion.types import ImageTask, InputImage, LoraUse, Reference, WeightedPrompt
from serve_app.library.templates import ResolvedTemplate
from serve_app.prompts.mapping import ImageSettings
from serve_app.prompts.params import PromptParams, WeightedSegment

SPEC_VERSION = 2  # 1: the untyped dict of jobs stored before issue 19 (still loaded: `from_stored`)


_IMAGE_PARAMS = ("image_prompts", "image_weight", "style_refs", "style_weight", "character_refs", "character_weight",
                 "omni_ref", "omni_weight")
UPLOAD = "upload"  # the source of bytes sent with the request itself (edits, variations): not re-fetchable


class ImageRef(BaseModel):
    """An input image by reference, never its bytes (a job row stays small): where it came from
    and the sha256 of its checked PNG. A job's runner loads `source` again and insists on the same
    sha256; a deleted file or a changed URL fails the job with a reason."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="http(s) URL, `file-...` id, or `upload`")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    param: str = Field(description="the request parameter it came from (`image`, `--sref`, ...), for errors")


class ReferenceSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["style", "character"]
    image: ImageRef
    scale: float = Field(ge=0.0)


class LoraRef(BaseModel):
    """A LoRA adapter resolved for this request's tenant: registry name and id, and its weight."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    adapter_id: str
    weight: float


class ImageSpec(ImageSettings):
    model_config = ConfigDict(frozen=True, extra="forbid")

    spec_version: Literal[2] = SPEC_VERSION
    model: str
    prompt: str  # what is drawn (OpenAI's `revised_prompt`): the expansion once `enhance` ran
    asked_prompt: str | None = None  # the rendered prompt before `enhance` replaced it
    weighted_prompts: tuple[WeightedSegment, ...] = ()  # `a::2 b::-0.5`; empty: `prompt` as one piece
    params: PromptParams  # the typed prompt parameters, as merged from prompt, template and style
    enhance: bool = False  # still to be expanded by the LLM (False once expanded)
    template: ResolvedTemplate | None = None  # the exact template version it was rendered from
    tenant: str | None = None  # who asked (a job's usage may be recorded by another replica)
    # Quality of service from the tenant's plan (images/qos.py): batch priority, adaptive quality,
    # and whether the PNG carries its parameters.
    priority: int = 0
    quality_auto: bool = False
    embed_metadata: bool = False
    quality: Literal["default", "draft"] = "default"  # "draft": the model's draft tier (optimize.draft)
    partial_images: int = 0  # previews per image (streamed, or a job's preview); needs the model's decoder
    # Images from images (images/conditioning.py): img2img from `init_image` at `strength`,
    # inpainting with `mask`, IP-Adapter `references`. References only: `tasks()` takes the bytes.
    init_image: ImageRef | None = None
    mask: ImageRef | None = None
    strength: float = Field(1.0, gt=0.0, le=1.0)
    references: tuple[ReferenceSpec, ...] = ()
    # LoRA adapters, resolved by ImagesService.render (the names in `params.loras`, as registry ids).
    loras: tuple[LoraRef, ...] = ()

    @property
    def adapter_set(self) -> str:
        """The Serve multiplexed model id of this request's adapters ('' for none)."""
        from deployments.adapters import multiplexed_id

        return multiplexed_id([r.adapter_id for r in self.loras])

    @property
    def image_refs(self) -> tuple[ImageRef, ...]:
        """Every input image the spec refers to (what a job's runner loads again)."""
        own = tuple(r for r in (self.init_image, self.mask) if r is not None)
        return (*own, *(r.image for r in self.references))

    def tasks(self, task_ids: list[str] | None = None, trace_context: dict[str, str] | None = None,
              images: Mapping[str, InputImage] | None = None) -> tuple[ImageTask, ...]:
        """One `ImageTask` per image; `task_ids` tie progress and cancellation to a job; `images`
        are the loaded input images by sha256 (every one of `image_refs`)."""
        weighted = tuple(WeightedPrompt(w.text, w.weight) for w in self.weighted_prompts)
        loaded = images or {}
        missing = [r.source for r in self.image_refs if r.sha256 not in loaded]
        if missing:
            raise ValueError(f"input images not loaded: {missing}")

        def get(ref: ImageRef | None) -> InputImage | None:
            return loaded[ref.sha256] if ref is not None else None

        init, mask = get(self.init_image), get(self.mask)
        refs = tuple(Reference(kind=r.kind, image=loaded[r.image.sha256], scale=r.scale) for r in self.references)
        return tuple(ImageTask(
            prompt=self.prompt, negative_prompt=self.negative_prompt, seed=seed, width=self.width,
            height=self.height, steps=self.steps, guidance_scale=guidance, tile=self.tile, weighted_prompts=weighted,
            task_id=task_ids[i] if task_ids else None, trace_context=trace_context, priority=self.priority,
            quality_auto=self.quality_auto, embed_metadata=self.embed_metadata, quality=self.quality,
            partial_images=self.partial_images, init_image=init, mask=mask,
            strength=self.strength if init is not None else 1.0, references=refs,
            loras=tuple(LoraUse(r.adapter_id, r.weight) for r in self.loras))
            for i, (seed, guidance) in enumerate(zip(self.seeds, self.guidance_scales, strict=True)))

    def _unused_image_params(self) -> set[str]:
        # The image fields (issue 20) show only when given: the view of other requests is as before.
        unset = PromptParams()
        return {k for k in _IMAGE_PARAMS if getattr(self.params, k) == getattr(unset, k)}

    def describe(self) -> dict[str, Any]:
        """The public view (`/v1/prompts/render`, `Job.params`, the generation log's `params`)."""
        return {
            "model": self.model, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "width": self.width, "height": self.height, "steps": self.steps,
            "guidance_scale": list(self.guidance_scales), "seeds": list(self.seeds), "tile": self.tile,
            "weighted_prompts": [{"text": w.text, "weight": w.weight} for w in self.weighted_prompts],
            # Image and LoRA keys only when used: the view of other requests stays as it was.
            "params": self.params.model_dump(mode="json", exclude=self._unused_image_params()
                                             | (set() if self.params.loras else {"loras"})),
            **({"init_image": self.init_image.model_dump(), "strength": self.strength} if self.init_image else {}),
            **({"mask": self.mask.model_dump()} if self.mask else {}),
            **({"references": [r.model_dump() for r in self.references]} if self.references else {}),
            **({"quality": self.quality} if self.quality != "default" else {}),
            **({"loras": [{"name": r.name, "id": r.adapter_id, "weight": r.weight} for r in self.loras]}
               if self.loras else {}),
        }

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> ImageSpec:
        """A job's stored spec: this model's JSON, or the dict jobs stored before it (version 1:
        `tasks` as ImageTask dicts, `params` = the describe() view, `template_ref`, `asked_prompt`)."""
        if data.get("spec_version") == SPEC_VERSION:
            return cls.model_validate(data)
        tasks = data["tasks"]
        first = tasks[0]
        view = data.get("params") or {}
        ref = data.get("template_ref")
        return cls(
            model=data["model"], prompt=data["prompt"], asked_prompt=data.get("asked_prompt"),
            negative_prompt=data.get("negative_prompt", first.get("negative_prompt", "")),
            width=first["width"], height=first["height"], steps=first["steps"], tile=first.get("tile", False),
            seeds=tuple(t["seed"] for t in tasks), guidance_scales=tuple(t["guidance_scale"] for t in tasks),
            weighted_prompts=tuple(WeightedSegment(**w) for w in first.get("weighted_prompts") or ()),
            params=PromptParams.model_validate(view.get("params") or {}),
            template=ResolvedTemplate(**ref) if ref else None, tenant=data.get("tenant"),
            priority=first.get("priority", 0), quality_auto=first.get("quality_auto", False),
            embed_metadata=first.get("embed_metadata", False))


__all__ = ["SPEC_VERSION", "UPLOAD", "ImageRef", "ImageSpec", "ReferenceSpec"]
