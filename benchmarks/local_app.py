"""A whole genserve app on a private local Ray cluster, for benchmarks that compare two settings
in ONE run: tiny SDXL on CPU, one ingress and ONE diffusion replica unless `replicas=` says more
(a fixed number, no autoscaling, so the comparison is not decided by when a replica starts),
plans and tenants of the caller's.

    with local_app.serve_app(models_dir, plans=[...], tenants={"a": "plan"}, model={...}) as app:
        httpx.post(app.url + "/v1/images/generations", headers=app.auth("a"), json=...)

The cluster is started with `ray.init` (free ports, no dashboard) and shut down on exit; it never
connects to another cluster on the machine.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
APP = "bench"
MODEL = "sdxl-tiny"
# A plan without limits: benchmarks measure scheduling, not quotas.
UNLIMITED = {"requests_per_minute": None, "tokens_per_minute": None, "images_per_minute": None,
             "max_concurrent_requests": None, "max_image_side": None, "max_steps": None,
             "monthly_budget_usd": None}


@dataclass
class LocalApp:
    url: str
    keys: dict[str, str]
    doc: dict

    def auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def stats(self) -> dict:
        from ray import serve

        return serve.get_deployment_handle(f"Diffusion-{MODEL}", app_name=APP).stats.remote().result()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_models_dir() -> Path:
    return Path(os.environ.get("GENSERVE_WORK", REPO / ".work")) / "models"


def app_doc(models_dir: Path, work: Path, port: int, *, plans: list[dict], model: dict | None = None,
            max_ongoing_requests: int = 32, replicas: int = 1) -> dict:
    entry = {"name": MODEL, "family": "sdxl", "model": str(models_dir / "sdxl-tiny"), "device": "cpu",
             "native_resolution": 64, "size_multiple": 8, "min_side": 32, "max_side": 128,
             "default_steps": 8, "max_steps": 50, **(model or {})}
    args = {"work_dir": str(work), "diffusion_models": [entry],
            "tenancy": {"plans": plans, "default_plan": plans[0]["name"], "local_tenant": {"enabled": False}}}
    return {
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "serve_app.graph:build_app", "args": args,
            "deployments": [
                {"name": "Ingress", "num_replicas": 1, "max_ongoing_requests": 1024,
                 "ray_actor_options": {"num_cpus": 0.5}},
                # Serve's router queue in front of the replica is FIFO: only what the replica holds
                # (max_ongoing_requests) is reordered by priority or counted as its load.
                {"name": f"Diffusion-{MODEL}", "num_replicas": replicas, "max_ongoing_requests": max_ongoing_requests,
                 "max_queued_requests": 4096, "ray_actor_options": {"num_cpus": 1}},
            ],
        }],
    }


def _create_tenants(doc: dict, tenants: dict[str, str]) -> dict[str, str]:
    from serve_app.config import load_app_config
    from serve_app.tenancy import Tenancy

    cfg = load_app_config(doc["applications"][0]["args"])
    tenancy = Tenancy(cfg.tenancy, work_dir=cfg.work_dir)  # runs the migrations
    try:
        keys = {}
        for name, plan in tenants.items():
            tenancy.create_tenant(name, plan)
            keys[name] = tenancy.create_key(name).key
        return keys
    finally:
        tenancy.close()


@contextlib.contextmanager
def serve_app(models_dir: Path, *, plans: list[dict], tenants: dict[str, str], model: dict | None = None,
              max_ongoing_requests: int = 32, replicas: int = 1) -> Iterator[LocalApp]:
    import ray
    from ray import serve

    from deployments.diffusion.tiny import build_all_tiny
    from serve_app import launcher

    build_all_tiny(models_dir)
    work = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    port = _free_port()
    doc = app_doc(models_dir, work, port, plans=plans, model=model, max_ongoing_requests=max_ongoing_requests,
                  replicas=replicas)
    keys = _create_tenants(doc, tenants)
    env = {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "PATH", "HF_HUB_OFFLINE")}
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        launcher.deploy(doc)
        launcher.wait_running(APP, timeout_s=600)
        yield LocalApp(url=f"http://127.0.0.1:{port}", keys=keys, doc=doc)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def machine() -> dict[str, Any]:
    import ray
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "model": "tiny SDXL (random weights), CPU",
            # Other work on a shared machine shifts absolute latencies (ratios much less): say how busy it was.
            "loadavg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()]}


def p95(xs: list[float]) -> float:
    """Nearest-rank 95th percentile (nan for no samples)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, -(-95 * len(s) // 100) - 1)]
