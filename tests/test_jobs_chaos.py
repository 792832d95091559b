"""Nothing lost: kill a diffusion replica and an ingress replica while jobs run; every accepted
job still ends `succeeded` (or `failed` with a reason after its retries), none stays running."""

from __future__ import annotations

import time

import httpx
import pytest
import ray
from ray import serve

from deployments.diffusion.deployment import DiffusionDeployment
from serve_app.config import load_app_config
from serve_app.ingress import Ingress
from serve_app.tenancy import Tenancy

pytestmark = pytest.mark.ray

APP = "chaos"


def _replica_actor(deployment: str):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#")]
    assert names, f"no replica of {deployment}"
    return ray.get_actor(names[0], namespace="serve")


def test_jobs_survive_killed_replicas(genserve_url: str, tiny_models_dir, tmp_path) -> None:
    cfg = load_app_config({
        "work_dir": str(tmp_path),
        "diffusion_models": [{"name": "chaos-tiny", "family": "sdxl", "model": str(tiny_models_dir / "sdxl-tiny"),
                              "native_resolution": 64, "size_multiple": 8, "min_side": 32, "max_side": 64,
                              "default_steps": 8, "max_steps": 16,
                              "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}}],
        "jobs": {"lease_s": 3, "heartbeat_s": 0.5, "reap_interval_s": 0.5, "max_attempts": 4,
                 "retry_backoff_s": 0.2},
        "tenancy": {"local_tenant": {"enabled": False}},
    })
    tenancy = Tenancy(cfg.tenancy, work_dir=cfg.work_dir)
    tenancy.create_tenant("chaos-co", "enterprise")
    key = tenancy.create_key("chaos-co").key
    tenancy.close()
    m = cfg.diffusion_models[0]
    diffusion = DiffusionDeployment.options(name=m.deployment_name, ray_actor_options={"num_cpus": 0.1},
                                  max_ongoing_requests=16).bind(
        m.model_copy(update={"device": "cpu"}))
    app = Ingress.options(num_replicas=2, ray_actor_options={"num_cpus": 0.1}).bind(cfg, {m.name: diffusion}, {})
    serve._run(app, name=APP, route_prefix="/chaos", _blocking=True)
    base = genserve_url + "/chaos"
    auth = {"Authorization": f"Bearer {key}"}
    try:
        accepted = []
        for i in range(12):
            r = httpx.post(base + "/v1/jobs", headers=auth, timeout=30,
                           json={"prompt": f"job {i}", "n": 2, "seed": i})
            assert r.status_code == 202, r.text
            accepted.append(r.json()["id"])
            if i == 4:
                ray.kill(_replica_actor("Diffusion-chaos-tiny"), no_restart=True)
            if i == 7:
                ray.kill(_replica_actor("Ingress"), no_restart=True)

        deadline = time.monotonic() + 240
        final: dict[str, dict] = {}
        while len(final) < len(accepted) and time.monotonic() < deadline:
            for job_id in accepted:
                if job_id in final:
                    continue
                try:
                    r = httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth, timeout=10)
                except httpx.HTTPError:
                    continue  # the killed ingress may still be in the proxy's routing table
                if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "cancelled"):
                    final[job_id] = r.json()
            time.sleep(0.5)
        assert set(final) == set(accepted), f"still active: {set(accepted) - set(final)}"
        statuses = {j["status"] for j in final.values()}
        assert statuses <= {"succeeded", "failed"}, statuses
        for j in final.values():
            if j["status"] == "failed":
                assert j["error"], j  # failed only with a reason
        succeeded = [j for j in final.values() if j["status"] == "succeeded"]
        assert len(succeeded) >= len(accepted) - 2, [(j["status"], j["error"]) for j in final.values()]
        assert all(len(j["results"]) == 2 for j in succeeded)
        print(f"\nchaos: {len(accepted)} accepted, {len(succeeded)} succeeded, "
              f"{max(j['attempts'] for j in final.values())} max attempts")
    finally:
        serve.delete(APP)
