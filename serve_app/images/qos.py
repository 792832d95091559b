"""Per-request quality-of-service fields stamped on the `ImageSpec` (and so on each `ImageTask`): the plan's priority
(the diffusion replica's batch queue serves higher first) and whether adaptive quality may lower
steps under load (docs/priority-and-quality.md), and whether the PNG carries its parameters
(`metadata`, default the plan's `png_metadata`; docs/security.md), and the quality tier
(`quality: "draft"` or the plan's `image_quality`: the model's draft tier, docs/optimize.md)."""

from __future__ import annotations

from typing import Literal

from serve_app.errors import unprocessable
from serve_app.images.spec import ImageSpec
from serve_app.tenancy.config import PlanConfig


def allows_auto_quality(plan: PlanConfig, quality: str | None, *, explicit_steps: bool, flag_q: bool) -> bool:
    """`quality: "auto"` opts in on any plan; no `quality` opts in where the plan does. An explicit
    `--q` or `steps` always wins: those requests run exactly as asked."""
    if explicit_steps or flag_q:
        return False
    if quality == "auto":
        return True
    return quality is None and plan.adaptive_quality


def embeds_metadata(plan: PlanConfig, metadata: bool | None) -> bool:
    """PNG text chunks (prompt, seed...): the request's `metadata` if given, else the plan's default."""
    return plan.png_metadata if metadata is None else metadata


def tier(plan: PlanConfig, quality: str | None, *, has_draft_tier: bool) -> Literal["default", "draft"]:
    """`quality: "draft"` asks for the draft tier (422 where the model has none); no `quality` gets
    the plan's `image_quality`, which falls back to the default on models without a draft tier."""
    if quality == "draft":
        if not has_draft_tier:
            raise unprocessable("This model has no draft tier (optimize.draft in its config); "
                                "leave `quality` out or use another model.", param="quality")
        return "draft"
    if quality is None and plan.image_quality == "draft" and has_draft_tier:
        return "draft"
    return "default"


def stamp(spec: ImageSpec, plan: PlanConfig, quality: str | None, *, explicit_steps: bool,
          metadata: bool | None = None, has_draft_tier: bool = False) -> ImageSpec:
    """`metadata`: the request's choice about PNG text chunks; None = the plan's `png_metadata`."""
    auto = allows_auto_quality(plan, quality, explicit_steps=explicit_steps, flag_q=spec.params.quality is not None)
    return spec.model_copy(update={"priority": plan.priority, "quality_auto": auto,
                                   "embed_metadata": embeds_metadata(plan, metadata),
                                   "quality": tier(plan, quality, has_draft_tier=has_draft_tier)})


__all__ = ["allows_auto_quality", "embeds_metadata", "stamp", "tier"]
