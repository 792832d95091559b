"""At capacity, `POST /v1/jobs` answers 503 with Retry-After (seed 000's "Service is at
capacity") instead of accepting work it cannot start; nothing is half-written."""

from __future__ import annotations

import httpx
import pytest
from ray import serve

from deployments.diffusion.deployment import DiffusionDeployment
from serve_app.config import load_app_config
from serve_app.ingress import Ingress
from serve_app.tenancy import Tenancy

pytestmark = pytest.mark.ray


def test_job_backlog_limit_gives_503_with_retry_after(genserve_url: str, tiny_models_dir, tmp_path) -> None:
    cfg = load_app_config({
        "work_dir": str(tmp_path),
        "diffusion_models": [{"name": "cap-tiny", "family": "sdxl", "model": str(tiny_models_dir / "sdxl-tiny"),
                              "native_resolution": 64, "size_multiple": 8, "min_side": 32, "max_side": 64,
                              "default_steps": 2, "max_steps": 400}],
        "jobs": {"max_backlog": 2},
        "tenancy": {"local_tenant": {"enabled": False}},
    })
    tenancy = Tenancy(cfg.tenancy, work_dir=cfg.work_dir)
    tenancy.create_tenant("cap-co", "enterprise")
    key = tenancy.create_key("cap-co").key
    tenancy.close()
    m = cfg.diffusion_models[0]
    diffusion = DiffusionDeployment.options(name=m.deployment_name, ray_actor_options={"num_cpus": 0.1}).bind(
        m.model_copy(update={"device": "cpu"}))
    app = Ingress.options(ray_actor_options={"num_cpus": 0.1}).bind(cfg, {m.name: diffusion}, {})
    serve._run(app, name="capacity", route_prefix="/cap", _blocking=True)
    auth = {"Authorization": f"Bearer {key}"}
    base = genserve_url + "/cap"
    try:
        # Two long jobs fill the backlog (4 images x 150 steps keep them active for seconds).
        held = [httpx.post(base + "/v1/jobs", headers=auth, timeout=30,
                           json={"prompt": f"slow {i}", "steps": 150, "n": 4, "size": "64x64"}) for i in range(2)]
        assert [r.status_code for r in held] == [202, 202], [r.text for r in held]
        r = httpx.post(base + "/v1/jobs", headers=auth, timeout=30, json={"prompt": "one too many"})
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) > 0 and r.json()["error"]["code"] == "at_capacity"
        listed = httpx.get(base + "/v1/jobs", headers=auth).json()["data"]
        assert {j["id"] for j in listed} == {h.json()["id"] for h in held}  # the refused job left no record
        for h in held:
            httpx.delete(f"{base}/v1/jobs/{h.json()['id']}", headers=auth)
    finally:
        serve.delete("capacity")
