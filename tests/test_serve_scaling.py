"""Fractional-GPU placement and autoscaling of the diffusion deployment, on the shared cluster.

The cluster advertises one fake GPU (conftest), so Ray's scheduling of `num_gpus: 0.5` is real
even though the tiny model itself runs on the CPU."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray import serve

from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.deployment import DiffusionDeployment
from deployments.diffusion.types import ImageTask

pytestmark = pytest.mark.ray


def _replica_states(app: str, deployment: str) -> dict[str, int]:
    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    return {str(getattr(k, "value", k)): v for k, v in status.deployments[deployment].replica_states.items()}


def _wait(pred, timeout_s: float, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll_s)
    return pred()


def test_two_half_gpu_replicas_run_and_a_third_waits(genserve_url: str, tiny_models_dir) -> None:
    import ray

    app = DiffusionDeployment.options(name="Diffusion-placement", num_replicas=3,
                            ray_actor_options={"num_gpus": 0.5, "num_cpus": 0.1}).bind(
        DiffusionModelConfig(name="placement", family="sdxl", model=str(tiny_models_dir / "sdxl-tiny"), device="cpu"))
    handle = serve._run(app, name="placement", route_prefix=None, _blocking=False)
    try:
        assert _wait(lambda: _replica_states("placement", "Diffusion-placement").get("RUNNING") == 2, 120)
        time.sleep(3)  # the third replica must still be waiting for GPU, not just slow
        states = _replica_states("placement", "Diffusion-placement")
        assert states.get("RUNNING") == 2 and sum(states.values()) == 3, states
        assert ray.available_resources().get("GPU", 0) == 0
        stats = handle.stats.remote().result(timeout_s=30)
        assert stats["assigned_resources"].get("GPU") == 0.5 and stats["gpu_ids"] == ["0"]
    finally:
        serve.delete("placement")


def test_autoscales_from_one_to_two_replicas_under_load(genserve_url: str, tiny_models_dir) -> None:
    app = DiffusionDeployment.options(
        name="Diffusion-autoscale", max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.1},
        autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                            "upscale_delay_s": 1, "downscale_delay_s": 600, "metrics_interval_s": 0.5,
                            "look_back_period_s": 2},
    ).bind(DiffusionModelConfig(name="autoscale", family="sdxl", model=str(tiny_models_dir / "sdxl-tiny"),
                                device="cpu", batching={"max_batch_size": 2, "batch_wait_timeout_s": 0.0}))
    handle = serve._run(app, name="autoscale", route_prefix=None, _blocking=True)
    task = ImageTask(prompt="load", negative_prompt="", seed=1, width=64, height=64, steps=8, guidance_scale=5.0)

    async def load(seconds: float) -> float | None:
        start = time.monotonic()
        scaled_at = None
        pending: set = set()
        while time.monotonic() - start < seconds:
            while len(pending) < 12:
                pending.add(asyncio.ensure_future(handle.generate.remote(task)))
            _, pending = await asyncio.wait(pending, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            # The autoscaler's decision (a second replica asked for) is what is tested here; how
            # long that replica takes to load the model depends on the machine (checked below).
            states = _replica_states("autoscale", "Diffusion-autoscale")
            if scaled_at is None and states.get("RUNNING", 0) + states.get("STARTING", 0) >= 2:
                scaled_at = time.monotonic() - start
                break
        for p in pending:
            p.cancel()
        return scaled_at

    try:
        assert _replica_states("autoscale", "Diffusion-autoscale").get("RUNNING") == 1
        scaled_at = asyncio.run(load(30))
        assert scaled_at is not None and scaled_at <= 30, _replica_states("autoscale", "Diffusion-autoscale")
        # ... and the new replica comes up (downscale_delay_s is 600: nothing scales it back meanwhile).
        assert _wait(lambda: _replica_states("autoscale", "Diffusion-autoscale").get("RUNNING", 0) >= 2, 120), \
            _replica_states("autoscale", "Diffusion-autoscale")
    finally:
        serve.delete("autoscale")
