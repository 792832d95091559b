"""Adaptive quality: fewer denoising steps (or the draft tier) while this replica is overloaded.

Load is the replica's own view: (images queued + images in the running batch) / max_batch_size,
so 1.0 means "a full batch is waiting or running". Hysteresis keeps it from flapping: degrade
once load exceeds `high_water`; restore only after load has stayed at or below `low_water` for
`hold_s` seconds. Only tasks that allow it (`ImageTask.quality_auto`, never an explicit `--q` or
`steps`) are changed, and only within bounds: steps = max(min_steps, ceil(steps · fraction)),
never more than asked for; or, with `fallback: draft`, they run as the model's draft tier
(`quality: "draft"`: DeepCache-style reuse and/or fewer steps, optimize.draft). Settings: `AdaptiveQualityConfig` (deployments/diffusion/config.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

from deployments.diffusion.config import AdaptiveQualityConfig
from deployments.diffusion.types import ImageTask

REASON_LOAD = "load"


class AdaptiveQuality:
    def __init__(self, settings: AdaptiveQualityConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self.degraded = False
        self._last_above_low = -math.inf  # last time load was seen above low_water
        self.load = 0.0

    def observe(self, load: float) -> bool:
        """Feed the current load; returns whether new work is degraded."""
        s = self.settings
        now = self._clock()
        self.load = load
        if not s.enabled:
            self.degraded = False
            return False
        if load > s.low_water:
            self._last_above_low = now
        if load > s.high_water:
            self.degraded = True
        elif self.degraded and load <= s.low_water and now - self._last_above_low >= s.hold_s:
            self.degraded = False
        return self.degraded

    def steps_for(self, steps: int) -> int:
        s = self.settings
        return min(steps, max(s.min_steps, math.ceil(steps * s.min_steps_fraction)))

    def apply(self, task: ImageTask, load: float) -> tuple[ImageTask, bool]:
        """(the task to run, whether it was degraded). Observes `load` first."""
        degraded = self.observe(load)
        if not (degraded and task.quality_auto):
            return task, False
        if self.settings.fallback == "draft":
            if task.quality == "draft":
                return task, False
            return dataclasses.replace(task, quality="draft"), True
        steps = self.steps_for(task.steps)
        if steps == task.steps:
            return task, False
        return dataclasses.replace(task, steps=steps), True


__all__ = ["AdaptiveQuality", "REASON_LOAD"]
