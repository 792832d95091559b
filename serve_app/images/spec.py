"""`ImageSpec`: one image request after rendering — the single typed, serialisable form of it.

What the replicas draw comes from it (`tasks()`), a job stores it and re-runs from it (`jobs.spec`),
the generation log and `Job.params` show it (`describe()`). A request takes three shapes on its way:
the HTTP body (`images.protocol`), the parsed prompt (`prompts.params.ParsedPrompt`), this spec; the
diffusion contract's `ImageTask` is the per-image wire form a replica takes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from deployments.diffusion.types import ImageTask, LoraUse, WeightedPrompt
from serve_app.library.templates import ResolvedTemplate
from serve_app.prompts.mapping import ImageSettings
from serve_app.prompts.params import PromptParams, WeightedSegment

SPEC_VERSION = 2  # 1: the untyped dict of jobs stored before issue 19 (still loaded: `from_stored`)


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
    # LoRA adapters, resolved by ImagesService.render (the names in `params.loras`, as registry ids).
    loras: tuple[LoraRef, ...] = ()

    @property
    def adapter_set(self) -> str:
        """The Serve multiplexed model id of this request's adapters ('' for none)."""
        from deployments.adapters import multiplexed_id

        return multiplexed_id([r.adapter_id for r in self.loras])

    def tasks(self, task_ids: list[str] | None = None,
              trace_context: dict[str, str] | None = None) -> tuple[ImageTask, ...]:
        """One `ImageTask` per image; `task_ids` tie progress and cancellation to a job."""
        weighted = tuple(WeightedPrompt(w.text, w.weight) for w in self.weighted_prompts)
        return tuple(ImageTask(
            prompt=self.prompt, negative_prompt=self.negative_prompt, seed=seed, width=self.width,
            height=self.height, steps=self.steps, guidance_scale=guidance, tile=self.tile, weighted_prompts=weighted,
            task_id=task_ids[i] if task_ids else None, trace_context=trace_context, priority=self.priority,
            quality_auto=self.quality_auto, embed_metadata=self.embed_metadata,
            loras=tuple(LoraUse(r.adapter_id, r.weight) for r in self.loras))
            for i, (seed, guidance) in enumerate(zip(self.seeds, self.guidance_scales, strict=True)))

    def describe(self) -> dict[str, Any]:
        """The public view (`/v1/prompts/render`, `Job.params`, the generation log's `params`)."""
        return {
            "model": self.model, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "width": self.width, "height": self.height, "steps": self.steps,
            "guidance_scale": list(self.guidance_scales), "seeds": list(self.seeds), "tile": self.tile,
            "weighted_prompts": [{"text": w.text, "weight": w.weight} for w in self.weighted_prompts],
            # LoRA keys only when used: the view of requests without adapters stays as it was.
            "params": self.params.model_dump(mode="json", exclude=set() if self.params.loras else {"loras"}),
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


__all__ = ["SPEC_VERSION", "ImageSpec"]
