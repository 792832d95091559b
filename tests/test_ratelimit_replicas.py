"""Exact rate limits across ingress replicas: 2 replicas, a limit of L per window → exactly L."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray import serve

from deployments.diffusion.deployment import DiffusionDeployment
from serve_app.config import load_app_config
from serve_app.ingress import Ingress
from serve_app.tenancy import Tenancy

pytestmark = pytest.mark.ray

LIMIT = 7


def test_two_ingress_replicas_admit_exactly_the_limit(genserve_url: str, tiny_models_dir, tmp_path) -> None:
    cfg = load_app_config({
        "work_dir": str(tmp_path),
        "diffusion_models": [{"name": "rl-tiny", "family": "sdxl", "model": str(tiny_models_dir / "sdxl-tiny"),
                              "native_resolution": 32, "size_multiple": 8, "min_side": 32, "max_side": 64,
                              "default_steps": 1, "max_steps": 2}],
        "tenancy": {
            # One long window, so the test can't straddle two windows.
            "rate_window_s": 3600,
            "local_tenant": {"enabled": False},
            "plans": [{"name": "limited", "requests_per_minute": LIMIT, "images_per_minute": 1000,
                       "max_concurrent_requests": 100, "monthly_budget_usd": None}],
            "default_plan": "limited",
        },
    })
    tenancy = Tenancy(cfg.tenancy, work_dir=cfg.work_dir)
    tenancy.create_tenant("acme", "limited")
    key = tenancy.create_key("acme").key
    tenancy.close()

    m = cfg.diffusion_models[0]
    diffusion = DiffusionDeployment.options(name=m.deployment_name, ray_actor_options={"num_cpus": 0.1}).bind(
        m.model_copy(update={"device": "cpu"}))
    app = Ingress.options(num_replicas=2, ray_actor_options={"num_cpus": 0.1}).bind(cfg, {m.name: diffusion}, {})
    serve._run(app, name="ratelimit", route_prefix="/rl", _blocking=True)
    try:
        status = serve.status().applications["ratelimit"].deployments["Ingress"]
        assert dict(status.replica_states).get("RUNNING") == 2 or sum(status.replica_states.values()) == 2

        async def fire(n: int) -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=genserve_url + "/rl", timeout=120,
                                         headers={"Authorization": f"Bearer {key}"}) as client:
                return await asyncio.gather(*(client.post("/v1/images/generations", json={"prompt": f"p{i}"})
                                              for i in range(n)))

        t0 = time.monotonic()
        responses = asyncio.run(fire(4 * LIMIT))
        codes = [r.status_code for r in responses]
        assert codes.count(200) == LIMIT, codes
        assert codes.count(429) == 3 * LIMIT, codes
        limited = next(r for r in responses if r.status_code == 429)
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.headers["x-ratelimit-limit-requests"] == str(LIMIT)
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert time.monotonic() - t0 < 120
    finally:
        serve.delete("ratelimit")
