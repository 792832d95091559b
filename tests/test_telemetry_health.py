"""Health: a broken diffusion engine fails `check_health`; an unhealthy deployment turns `/health`
into 503 and makes `genserve status` exit 1; a healthy app reports 0 and a table of its deployments."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner

from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.server import DiffusionServer
from deployments.diffusion.types import ImageTask
from serve_app.telemetry.status import metrics_urls, serve_load, status


def test_cuda_oom_makes_the_diffusion_server_unhealthy(tiny_models_dir: Path) -> None:
    server = DiffusionServer(DiffusionModelConfig(name="h", family="sdxl", model=str(tiny_models_dir / "sdxl-tiny"),
                                                  device="cpu"))
    server.check_health()
    task = ImageTask(prompt="x", negative_prompt="", seed=1, width=64, height=64, steps=2, guidance_scale=5.0)
    assert not isinstance(server.runner.denoise([(task, time.monotonic())])[0].image, BaseException)

    def out_of_memory(module: torch.nn.Module, args: tuple) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # The fault enters where a real one would: inside the UNet's forward, mid-denoising.
    hook = server.engine.pipeline.unet.register_forward_pre_hook(out_of_memory)
    try:
        [failed] = server.runner.denoise([(task, time.monotonic())])
    finally:
        hook.remove()
    assert isinstance(failed.image, torch.cuda.OutOfMemoryError)
    with pytest.raises(RuntimeError, match="unusable after: OutOfMemoryError"):
        server.check_health()  # what DiffusionDeployment.check_health runs: Serve then replaces the replica


# -- on the shared cluster --------------------------------------------------------------------

def _sick_app(flag: Path):
    """A probe application: the real `/health` router in an ingress, plus a deployment whose
    health check fails while `flag` exists (test code, pickled by value to the replicas)."""
    from fastapi import FastAPI
    from ray import cloudpickle, serve

    from serve_app.api import health

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    api = FastAPI()
    api.include_router(health.router)

    @serve.deployment(name="Flaky", health_check_period_s=1, health_check_timeout_s=5,
                      ray_actor_options={"num_cpus": 0})
    class Flaky:
        def check_health(self) -> None:
            if os.path.exists(str(flag)):
                raise RuntimeError(f"{flag} exists")

        def __call__(self) -> str:
            return "ok"

    @serve.deployment(name="ProbeIngress", ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class ProbeIngress:
        def __init__(self, flaky) -> None:  # type: ignore[no-untyped-def]
            self.flaky = flaky

    return ProbeIngress.bind(Flaky.bind())


@pytest.mark.ray
def test_status_cli_on_the_healthy_app(genserve_url: str) -> None:
    # Ongoing/queued come from Serve's gauges: the series exist for every deployment (names right).
    deadline = time.monotonic() + 60
    while set(serve_load(metrics_urls(), "genserve")) < {"Ingress", "Diffusion-sdxl-tiny", "LLM-tiny-chat"}:
        assert time.monotonic() < deadline, serve_load(metrics_urls(), "genserve")
        time.sleep(2)
    res = CliRunner().invoke(status, ["--app", "genserve"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("application genserve: RUNNING (healthy)")
    lines = {line.split()[0]: line.split() for line in res.output.splitlines()[3:] if line.strip()}
    for name in ("Ingress", "Diffusion-sdxl-tiny", "Diffusion-wuerstchen-tiny", "LLM-tiny-chat"):
        row = lines[name]
        assert row[1] == "HEALTHY" and row[2].startswith("RUNNING=") and row[-1] == "ok", row
        float(row[-3]), float(row[-2])  # ongoing and queued, read from Serve's gauges
    as_json = CliRunner().invoke(status, ["--app", "genserve", "--json"])
    assert as_json.exit_code == 0 and '"healthy": true' in as_json.output
    missing = CliRunner().invoke(status, ["--app", "no-such-app"])
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output


@pytest.mark.ray
def test_unhealthy_deployment_makes_health_503_and_status_fail(genserve_url: str, tmp_path: Path) -> None:
    from ray import serve

    flag = tmp_path / "sick"
    serve.run(_sick_app(flag), name="probe", route_prefix="/probe")
    try:
        assert httpx.get(genserve_url + "/probe/health", timeout=30).status_code == 200
        flag.touch()
        deadline, r = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            r = httpx.get(genserve_url + "/probe/health", timeout=30)
            if r.status_code == 503:
                break
            time.sleep(1)
        assert r is not None and r.status_code == 503, r.text if r else None
        body = r.json()
        assert body["status"] == "unhealthy" and any(reason.startswith("Flaky:") for reason in body["reasons"])
        assert r.headers["Retry-After"] == "5"
        res = CliRunner().invoke(status, ["--app", "probe"])
        assert res.exit_code == 1, res.output
        assert "UNHEALTHY" in res.output and "Flaky" in res.output
        flag.unlink()  # recovers: Serve replaced the replica, its checks pass again
        deadline = time.monotonic() + 90
        while httpx.get(genserve_url + "/probe/health", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "did not recover"
            time.sleep(1)
        assert CliRunner().invoke(status, ["--app", "probe"]).exit_code == 0
    finally:
        flag.unlink(missing_ok=True)
        serve.delete("probe")
