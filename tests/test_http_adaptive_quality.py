"""Adaptive quality end to end on the shared cluster (configs/local.yaml: sdxl-tiny, 2 default
steps, degrade to ceil(2 x 0.5) = 1 step above 1.5 batches of load, restore after 2 s calm)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.ray

BODY = {"prompt": "a lighthouse", "model": "sdxl-tiny", "size": "64x64", "quality": "auto"}


def _post(url: str, body: dict, auth: dict[str, str]) -> dict:
    r = httpx.post(f"{url}/v1/images/generations", json=body, headers=auth, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["genserve"]


def test_burst_degrades_steps_then_full_quality_returns(genserve_url: str, auth: dict) -> None:
    # 8 requests x n=4 = 32 images at once: load well above 1.5 batches of 8.
    with ThreadPoolExecutor(8) as pool:
        infos = list(pool.map(lambda _: _post(genserve_url, {**BODY, "n": 4}, auth), range(8)))
    degraded = [i for i in infos if i["degraded"]]
    assert degraded, infos
    for info in degraded:
        assert info["reason"] == "load"
        assert all(1 <= s <= 2 for s in info["steps_used"]) and min(info["steps_used"]) == 1
    # An explicit --q is never degraded, even while the replica still counts as loaded.
    explicit = _post(genserve_url, {**BODY, "prompt": "a lighthouse --q 1"}, auth)
    assert explicit["steps_used"] == [2] and not explicit.get("degraded")
    time.sleep(3)  # > hold_s (2 s) of calm
    calm = _post(genserve_url, BODY, auth)
    assert calm["steps_used"] == [2] and calm["steps"] == 2 and not calm.get("degraded")
