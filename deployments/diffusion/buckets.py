"""Size buckets: the few shapes a compiled replica runs (`optimize.buckets` of a model's config).

A compiled UNet is specialised to one latent height/width; every new size would compile again for
minutes inside a user's request. With buckets, a request's size snaps to the nearest bucket (in
log width / log height, so aspect ratio and area count alike), the image is generated at the
bucket and resized to the size asked for, and `warm_up` runs each bucket at replica start so the
compile (or the load from the compile cache) happens before the replica takes traffic.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deployments.diffusion.config import DiffusionModelConfig
    from deployments.diffusion.engine import DiffusionEngine

log = logging.getLogger(__name__)

Bucket = tuple[int, int]  # (width, height)

# SDXL's training aspect-ratio buckets around one megapixel (the sizes it draws best).
SDXL_BUCKETS = ("1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344",
                "1536x640", "640x1536")


def parse(spec: str) -> Bucket:
    """`"1216x832"` -> (1216, 832); ValueError naming the entry otherwise."""
    try:
        w, h = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"bucket {spec!r} must be WIDTHxHEIGHT, e.g. '1024x1024'") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"bucket {spec!r} must have positive sides")
    return w, h


def check_buckets(config: DiffusionModelConfig) -> None:
    """Every bucket must be a size the model's config accepts and fit one batch's pixel budget."""
    m = config.size_multiple
    for spec in config.optimize.buckets:
        w, h = parse(spec)
        if w % m or h % m:
            raise ValueError(f"optimize.buckets: {spec} is not a multiple of size_multiple ({m})")
        if not (config.min_side <= min(w, h) and max(w, h) <= config.max_side):
            raise ValueError(f"optimize.buckets: {spec} is outside min_side..max_side "
                             f"({config.min_side}..{config.max_side})")
        if w * h / 1e6 > config.batch_megapixels:
            raise ValueError(f"optimize.buckets: {spec} is larger than batching.max_batch_megapixels "
                             f"({config.batch_megapixels:g})")


def snap(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket nearest (width, height) in log space; (width, height) itself without buckets.
    Ties go to the smaller bucket (cheaper), then to the first listed."""
    if not buckets:
        return width, height

    def distance(b: Bucket) -> tuple[float, int]:
        d = math.hypot(math.log(b[0] / width), math.log(b[1] / height))
        return round(d, 9), b[0] * b[1]

    return min(buckets, key=distance)


def warmup_plan(config: DiffusionModelConfig) -> list[tuple[int, int, int]]:
    """(width, height, batch size) to run at start: each bucket at `warmup_batch_sizes`, or at 1 and
    the largest batch its megapixel budget allows. Empty without compile, buckets or warm-up."""
    opt = config.optimize
    if not (opt.compiled and opt.warmup and opt.buckets):
        return []
    plan = []
    for spec in opt.buckets:
        w, h = parse(spec)
        most = max(1, min(config.batching.max_batch_size, int(config.batch_megapixels // (w * h / 1e6))))
        sizes = sorted({b for b in opt.warmup_batch_sizes if b <= most}) or sorted({1, most})
        plan += [(w, h, b) for b in sizes]
    return plan


def warm_up(engine: DiffusionEngine, config: DiffusionModelConfig, steps: int = 3) -> list[dict[str, Any]]:
    """Run `warmup_plan(config)` through the engine (and each bucket once as a draft when the draft
    tier is on). Returns one timing row per run; the first row of a bucket holds its compile."""
    from deployments.diffusion import unet_split
    from deployments.diffusion.types import ImageTask

    rows = []
    draft = config.optimize.draft
    unet = getattr(engine.pipeline, "unet", None)
    for w, h, b in warmup_plan(config):
        runs = [("default", steps)]
        if draft.cache_interval > 1 and b == 1 and unet is not None:
            runs.append(("draft", max(steps, draft.cache_interval + 2)))  # full, reused, full: both paths
        for quality, n in runs:
            tasks = [ImageTask(prompt="warm-up", negative_prompt="", seed=i, width=w, height=h, steps=n,
                               guidance_scale=config.default_guidance) for i in range(b)]
            t0 = time.perf_counter()
            interval = draft.cache_interval if quality == "draft" else 0
            with unet_split.draft(unet, interval):
                out = engine.generate_images(tasks)
            errors = [o for o in out if isinstance(o, Exception)]
            if errors:
                raise RuntimeError(f"warm-up of {w}x{h} batch {b} failed: {errors[0]!r}") from errors[0]
            rows.append({"width": w, "height": h, "batch": b, "quality": quality, "steps": n,
                         "s": round(time.perf_counter() - t0, 2)})
            log.info("warm-up %s", rows[-1])
    return rows
