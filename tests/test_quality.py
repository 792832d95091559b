"""Adaptive quality policy (plain logic, fake clock) and the ingress's opt-in rules."""

from __future__ import annotations

import pytest

from deployments.diffusion.config import AdaptiveQualityConfig
from deployments.diffusion.quality import AdaptiveQuality
from deployments.diffusion.types import ImageTask
from serve_app.images.qos import allows_auto_quality
from serve_app.tenancy.config import PlanConfig


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _task(steps: int = 30, auto: bool = True) -> ImageTask:
    return ImageTask(prompt="p", negative_prompt="", seed=1, width=64, height=64, steps=steps,
                     guidance_scale=5.0, quality_auto=auto)


def _policy(clock: Clock, **kw) -> AdaptiveQuality:
    s = dict(enabled=True, high_water=1.5, low_water=0.5, hold_s=2.0, min_steps_fraction=0.5, min_steps=4)
    return AdaptiveQuality(AdaptiveQualityConfig(**{**s, **kw}), clock=clock)


def test_hysteresis_degrades_above_high_and_restores_after_hold_below_low() -> None:
    clock = Clock()
    q = _policy(clock)
    assert not q.observe(1.4)  # below high water: full quality
    assert q.observe(1.6)  # above: degraded
    clock.t = 1.0
    assert q.observe(1.0)  # between the marks: holds the degraded state (no flapping)
    clock.t = 2.0
    assert q.observe(0.4)  # below low water, but load was above low water 1 s ago (< hold_s)
    clock.t = 2.9
    assert q.observe(0.0)
    clock.t = 3.01
    assert not q.observe(0.0)  # 2.01 s since load was last above low water
    assert not q.observe(1.2)  # between the marks again: stays at full quality


def test_steps_scaled_within_bounds() -> None:
    q = _policy(Clock())
    assert q.steps_for(30) == 15
    assert q.steps_for(7) == 4  # ceil(3.5) = 4 = min_steps
    assert q.steps_for(5) == 4  # min_steps floor
    assert q.steps_for(2) == 2  # never more than asked
    task, degraded = q.apply(_task(30), load=5.0)
    assert (task.steps, degraded) == (15, True)


def test_tasks_without_auto_keep_their_steps() -> None:
    q = _policy(Clock())
    task, degraded = q.apply(_task(30, auto=False), load=5.0)
    assert (task.steps, degraded) == (30, False)


def test_disabled_policy_never_degrades() -> None:
    q = _policy(Clock(), enabled=False)
    task, degraded = q.apply(_task(30), load=100.0)
    assert (task.steps, degraded) == (30, False)


def test_settings_validation_names_values() -> None:
    with pytest.raises(ValueError, match=r"low_water \(2.0\) must be <= high_water \(1.0\)"):
        AdaptiveQualityConfig(low_water=2.0, high_water=1.0)
    with pytest.raises(ValueError, match=r"min_steps_fraction\n  Input should be greater than 0"):
        AdaptiveQualityConfig(min_steps_fraction=0.0)


def test_explicit_q_or_steps_wins_and_plan_opt_in() -> None:
    opted, plain = PlanConfig(name="a", adaptive_quality=True), PlanConfig(name="b")
    assert allows_auto_quality(opted, None, explicit_steps=False, flag_q=False)
    assert not allows_auto_quality(plain, None, explicit_steps=False, flag_q=False)
    assert allows_auto_quality(plain, "auto", explicit_steps=False, flag_q=False)
    assert not allows_auto_quality(opted, "auto", explicit_steps=False, flag_q=True)  # --q given
    assert not allows_auto_quality(opted, "auto", explicit_steps=True, flag_q=False)  # steps given
    assert not allows_auto_quality(opted, "hd", explicit_steps=False, flag_q=False)


def test_render_then_stamp_sets_priority_and_auto() -> None:
    from serve_app.config import AppConfig
    from serve_app.images.protocol import PromptRenderRequest
    from serve_app.images.qos import stamp
    from serve_app.images.render import ConfigTemplates, render_image_request

    cfg = AppConfig.model_validate({"diffusion_models": [
        {"name": "m", "family": "sdxl", "model": "/nonexistent", "default_steps": 30}]})
    plan = PlanConfig(name="p", priority=3, adaptive_quality=True)
    r = render_image_request(cfg, ConfigTemplates(cfg), PromptRenderRequest(prompt="a cat", n=2))
    assert all(t.priority == 3 and t.quality_auto for t in stamp(r, plan, None, explicit_steps=False).tasks())
    r = render_image_request(cfg, ConfigTemplates(cfg), PromptRenderRequest(prompt="a cat --q 0.5"))
    assert not stamp(r, plan, "auto", explicit_steps=False).tasks()[0].quality_auto
