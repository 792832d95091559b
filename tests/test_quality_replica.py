"""Adaptive quality inside a real diffusion replica's `DiffusionServer` (tiny SDXL on CPU, no Serve): the
queue draining after a burst is load, not calm. Full quality returns only after hold_s of calm
that the replica saw, not as soon as the first request after a long drain arrives."""

from __future__ import annotations

import asyncio
from pathlib import Path

from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.server import DiffusionServer
from deployments.diffusion.types import ImageTask

HOLD_S = 2.0


def _task(i: int) -> ImageTask:
    return ImageTask(prompt="p", negative_prompt="", seed=i, width=64, height=64, steps=8, guidance_scale=5.0,
                     quality_auto=True)


async def test_a_long_drain_is_not_calm(tiny_models_dir: Path) -> None:
    replica = DiffusionServer(DiffusionModelConfig(
        name="q", family="sdxl", model=str(tiny_models_dir / "sdxl-tiny"), device="cpu",
        batching={"max_batch_size": 4, "batch_wait_timeout_s": 0.0},
        adaptive_quality={"enabled": True, "high_water": 1.5, "low_water": 0.5, "hold_s": HOLD_S,
                          "min_steps_fraction": 0.5, "min_steps": 1}))
    await replica.generate(_task(0))  # warm-up, alone: full quality
    loop = asyncio.get_running_loop()
    started = loop.time()
    burst = await asyncio.gather(*(replica.generate(_task(i)) for i in range(48)))  # all arrive at once
    drain_s = loop.time() - started
    assert any(r.degraded for r in burst) and replica.quality.degraded
    # Every arrival was at the start: without observing the draining queue, the next arrival would
    # find "no load above low water for drain_s" and restore at once.
    assert drain_s > HOLD_S, f"the burst drained in {drain_s:.2f}s; make it longer than hold_s"
    after = await replica.generate(_task(100))
    assert after.degraded and after.steps == 4, (after.steps, after.degraded)
    await asyncio.sleep(HOLD_S + 0.2)  # real calm
    calm = await replica.generate(_task(101))
    assert calm.steps == 8 and not calm.degraded
