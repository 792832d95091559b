"""The draft tier as a request asks for it (issue 23 item 4): `quality: "draft"` or a plan's
`image_quality: draft` reaches `ImageTask.quality`, the replica runs it on the split UNet's draft
settings (fewer steps here) and reports it; adaptive quality may fall back to it under load; a
model without a draft tier refuses an explicit draft with a 422 naming `quality`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from deployments.diffusion.config import AdaptiveQualityConfig, DiffusionModelConfig
from deployments.diffusion.quality import AdaptiveQuality
from deployments.diffusion.server import DiffusionServer
from deployments.diffusion.types import ImageTask
from serve_app.errors import APIError
from serve_app.images.qos import tier
from serve_app.tenancy.config import PlanConfig

DRAFT = {"cache_interval": 0, "steps_fraction": 0.5}


def _task(seed: int = 1, quality: str = "default", auto: bool = False) -> ImageTask:
    return ImageTask(prompt="a red cube", negative_prompt="", seed=seed, width=64, height=64, steps=4,
                     guidance_scale=5.0, quality=quality, quality_auto=auto)  # type: ignore[arg-type]


def _config(tiny_models_dir: Path, **kw: object) -> DiffusionModelConfig:
    return DiffusionModelConfig(name="d", family="sdxl", model=str(tiny_models_dir / "sdxl-tiny"), device="cpu",
                                batching={"max_batch_size": 4, "batch_wait_timeout_s": 0.0}, **kw)


def test_tier_rules() -> None:
    plain, drafty = PlanConfig(name="p"), PlanConfig(name="d", image_quality="draft")
    assert tier(plain, "draft", has_draft_tier=True) == "draft"
    assert tier(plain, None, has_draft_tier=True) == "default"
    assert tier(drafty, None, has_draft_tier=True) == "draft"
    assert tier(drafty, None, has_draft_tier=False) == "default"  # the plan's default degrades gracefully
    assert tier(drafty, "hd", has_draft_tier=True) == "default"  # any explicit quality wins over the plan
    with pytest.raises(APIError) as err:
        tier(plain, "draft", has_draft_tier=False)
    assert err.value.status == 422 and err.value.param == "quality"


def test_fallback_draft_needs_a_draft_tier(tiny_models_dir: Path) -> None:
    with pytest.raises(ValidationError, match="no draft tier"):
        _config(tiny_models_dir, adaptive_quality={"enabled": True, "fallback": "draft"})
    cfg = _config(tiny_models_dir, adaptive_quality={"enabled": True, "fallback": "draft"}, optimize={"draft": DRAFT})
    assert cfg.has_draft_tier


def test_adaptive_quality_falls_back_to_the_draft_tier() -> None:
    q = AdaptiveQuality(AdaptiveQualityConfig(enabled=True, high_water=1.0, low_water=0.5, fallback="draft"))
    task, degraded = q.apply(_task(auto=True), load=2.0)
    assert degraded and task.quality == "draft" and task.steps == 4  # the tier decides the steps
    same, degraded = q.apply(_task(auto=False), load=2.0)
    assert not degraded and same.quality == "default"  # explicit requests are never degraded


def test_the_replica_runs_and_reports_a_draft_task(tiny_models_dir: Path) -> None:
    replica = DiffusionServer(_config(tiny_models_dir, optimize={"draft": DRAFT}))
    engine = replica.engine
    assert engine.total_steps(_task(quality="draft")) == 2 and engine.total_steps(_task()) == 4

    async def run() -> tuple:  # one event loop: the replica's batcher lives on it
        draft, default = await asyncio.gather(replica.generate(_task(quality="draft")), replica.generate(_task()))
        return draft, default, await replica.generate(_task(quality="draft"))

    draft, default, again = asyncio.run(run())
    assert (draft.quality, default.quality) == ("draft", "default")
    assert draft.png != default.png  # same seed, fewer steps: another image
    assert again.png == draft.png  # the seed rule holds on the draft tier


@pytest.mark.ray
def test_http_draft_on_a_model_without_a_draft_tier_is_a_422(genserve_url: str, auth: dict) -> None:
    body = {"prompt": "a lighthouse", "model": "sdxl-tiny", "size": "64x64"}
    r = httpx.post(f"{genserve_url}/v1/images/generations", json={**body, "quality": "draft"}, headers=auth,
                   timeout=120)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "quality"
    ok = httpx.post(f"{genserve_url}/v1/images/generations", json={**body, "quality": "standard"}, headers=auth,
                    timeout=120)
    assert ok.status_code == 200, ok.text
    assert ok.json()["genserve"]["quality"] == ["default"]
