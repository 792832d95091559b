"""Replica start-up warm-up: run each size bucket (buckets.py) through the engine before traffic, so
the compile (or the load from the persistent compile cache) happens at start, not in a request.
The deployment's server calls it right after building the engine."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from deployments.diffusion.buckets import parse

if TYPE_CHECKING:
    from deployments.diffusion.config import DiffusionModelConfig
    from deployments.diffusion.engine import DiffusionEngine

log = logging.getLogger(__name__)


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
