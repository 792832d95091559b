"""The image rules of the diffusion contract: one definition, used by the ingress (prompt parser,
renderer, request models) and by the engine (`DiffusionEngine.validate`).

Each check raises `ValueError` with a diffusers-style message that names the value; callers that
know the user's spelling (`--ar` vs `--aspect`, the JSON field) wrap it in their own error type.

Seeds: 0..2**32-1 everywhere. That is what the public side already promised (OpenAI-style `seed`,
Midjourney's `--seed`, the Telegram bot and the playground), it survives every JSON client
(2**64 does not fit a JavaScript number), and image i of a request uses (seed + i) mod 2**32, so a
request never leaves the range. torch would take up to 2**64, but no caller could ask for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from deployments.diffusion.types import ImageTask

SEED_MAX = 2**32 - 1
MAX_ASPECT_RATIO = 4  # --ar lies between 1:4 and 4:1
MAX_ASPECT_SIDE = 999_999  # either number of W:H


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"`seed` has to be an integer from 0 to {SEED_MAX} but is {seed!r}.")


def seed_for_image(seed: int, index: int) -> int:
    """Seed of image `index` of a request: distinct per image, reproducible, never out of range."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return (seed + index) % (SEED_MAX + 1)


def check_aspect_ratio(width: int, height: int, *, name: str = "--ar") -> None:
    """An aspect ratio W:H as written by the user (`name` is how they wrote the flag)."""
    if not (1 <= width <= MAX_ASPECT_SIDE and 1 <= height <= MAX_ASPECT_SIDE):
        raise ValueError(f"{name} sides must be integers from 1 to {MAX_ASPECT_SIDE}, got {width}:{height}")
    if width > MAX_ASPECT_RATIO * height or height > MAX_ASPECT_RATIO * width:
        raise ValueError(f"{name} must be between 1:{MAX_ASPECT_RATIO} and {MAX_ASPECT_RATIO}:1, "
                         f"got {width}:{height}")


def check_weights(weights: Sequence[float]) -> None:
    """Multi-prompt weights (`a::2 b::-0.5`) are combined as sum(w_i·e_i) / sum(w_i): the sum must
    be a finite number above 0."""
    total = math.fsum(weights)
    if not math.isfinite(total) or total <= 0:
        shown = " + ".join(f"{w:g}" for w in list(weights)[:8])
        raise ValueError(f":: weights must sum to more than 0, got {shown} = {total:g}")


def check_steps(steps: int, max_steps: int | None = None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` has to be a positive integer but is {steps!r}.")
    if max_steps is not None and steps > max_steps:
        raise ValueError(f"steps ({steps}) exceed the limit of {max_steps}.")


def check_guidance(guidance_scale: float) -> None:
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"`guidance_scale` has to be a finite number >= 0 but is {guidance_scale!r}.")


@dataclass(frozen=True)
class SizeRules:
    """Which widths and heights a model takes: multiples of `multiple` from `min_side` to `max_side`.

    The model's config sets them (`size_multiple`, `min_side`, `max_side`); the engine checks at load
    that they lie within what its pipeline can draw (`covered_by`), so a size the ingress accepts
    never fails in the replica."""

    multiple: int
    min_side: int
    max_side: int | None = None

    def check(self, width: int, height: int, *, model: str | None = None) -> None:
        of = f" for model {model!r}" if model else ""
        m = self.multiple
        if width % m or height % m:
            raise ValueError(f"`width` and `height` have to be divisible by {m}{of} but are {width} and {height}.")
        hi = self.max_side
        if width < self.min_side or height < self.min_side or (hi is not None and (width > hi or height > hi)):
            upper = f" and {hi}" if hi is not None else " and any size above"
            raise ValueError(f"`width` and `height` must be between {self.min_side}{upper}{of} "
                             f"but are {width} and {height}.")

    def covered_by(self, pipeline: SizeRules) -> None:
        """Raise unless every size these rules accept is one `pipeline` can draw."""
        if self.multiple % pipeline.multiple or self.min_side < pipeline.min_side:
            raise ValueError(f"size_multiple ({self.multiple}) must be a multiple of {pipeline.multiple} and "
                             f"min_side ({self.min_side}) at least {pipeline.min_side} for this pipeline")


def check_task(task: ImageTask, size: SizeRules, *, model: str | None = None) -> None:
    """Everything one image must satisfy before a replica runs it (the engine's `validate`)."""
    size.check(task.width, task.height, model=model)
    check_steps(task.steps)
    check_guidance(task.guidance_scale)
    check_seed(task.seed)
    if task.weighted_prompts:
        check_weights([p.weight for p in task.weighted_prompts])
    check_partial_images(task.partial_images)


MAX_PARTIAL_IMAGES = 3  # OpenAI's `partial_images` range is 0..3


def check_partial_images(n: int) -> None:
    if not 0 <= n <= MAX_PARTIAL_IMAGES:
        raise ValueError(f"`partial_images` must be between 0 and {MAX_PARTIAL_IMAGES}, got {n}")


__all__ = ["MAX_ASPECT_RATIO", "MAX_ASPECT_SIDE", "MAX_PARTIAL_IMAGES", "SEED_MAX", "SizeRules", "check_aspect_ratio",
           "check_guidance", "check_partial_images", "check_seed", "check_steps", "check_task", "check_weights", "seed_for_image"]
