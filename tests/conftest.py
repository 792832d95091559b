"""Shared fixtures: tiny models built once, ONE local Ray cluster per test session, and the app
deployed from the committed configs/local.yaml (its `deployments:` overrides included)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("GENSERVE_WORK", REPO / ".work")).resolve()
os.environ["GENSERVE_WORK"] = str(WORK)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# configs/serve.yaml requires it (result URLs come from config, never from Host); tests validate that file.
os.environ.setdefault("GENSERVE_PUBLIC_BASE_URL", "https://genserve.example.com")
ARTIFACTS = REPO / "tests" / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_models_dir() -> Path:
    """Tiny random-weight models, built from config once and reused (same dir as `make run`)."""
    from deployments.diffusion.tiny import build_all_tiny

    out = WORK / "models"
    build_all_tiny(out)
    try:
        from deployments.llm.tiny import build_tiny_llm
    except ImportError:
        pass
    else:
        build_tiny_llm(out / "llm-tiny")
    return out


@pytest.fixture(scope="session")
def ray_cluster(tiny_models_dir: Path):
    """One local cluster for the whole session (ray.init ~2 s, teardown ~7 s: never per test).

    It advertises one fake GPU so fractional-GPU placement can be tested on CPU; the main app
    asks for none."""
    import ray
    from ray import serve

    # `_metrics_export_port`: the node's Prometheus endpoint (tests scrape it via `metrics_url`).
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False, _metrics_export_port=free_port(),
             runtime_env={"env_vars": {"GENSERVE_WORK": str(WORK), "HF_HUB_OFFLINE": "1"}})
    yield ray
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(ray_cluster) -> str:
    """The shared cluster's Prometheus endpoint (Ray's metrics agent; it refreshes every few seconds)."""
    node = next(n for n in ray_cluster.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


ADMIN_TOKEN = "test-admin-token"
WEBHOOK_SECRET = "test-webhook-secret"


def local_config_doc(port: int, work_dir: Path) -> dict:
    """configs/local.yaml with a free port and this session's own database/results dir."""
    doc = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    doc["http_options"]["port"] = port
    args = doc["applications"][0]["args"]
    args["work_dir"] = str(work_dir)
    args.setdefault("tenancy", {})["admin_token"] = ADMIN_TOKEN
    # The default plans plus one that allows 2 requests at a time and nothing else limited (the
    # disconnect soak, test_tenancy_disconnect_http.py, must not run into the free plan's 20 rpm).
    from serve_app.tenancy.config import _default_plans

    args["tenancy"].setdefault("plans", [p.model_dump() for p in _default_plans()] + [
        {"name": "two-at-a-time", "requests_per_minute": None, "tokens_per_minute": None, "images_per_minute": None,
         "max_concurrent_requests": 2, "monthly_budget_usd": 1000.0}])
    # A GPU-memory budget below one 256² Würstchen image, so the 422 for oversize images is testable.
    wurst = next(m for m in args["diffusion_models"] if m["name"] == "wuerstchen-tiny")
    wurst["batching"]["max_batch_megapixels"] = 0.05
    # Short leases so lost jobs are re-run within seconds; webhooks may target this host.
    args["jobs"] = {"lease_s": 4, "heartbeat_s": 1, "reap_interval_s": 1, "retry_backoff_s": 0.2,
                    "webhooks": {"secret": WEBHOOK_SECRET, "allow_hosts": ["127.0.0.1"], "backoff_s": 0.2}}
    # Image prompts and references may be fetched from a test's image server on this host (the URL
    # guard refuses loopback otherwise: tests/test_images_inputs.py checks that refusal).
    args["image_inputs"] = {"allow_hosts": ["127.0.0.1"], "fetch_timeout_s": 3}
    return doc


@pytest.fixture(scope="session")
def app_work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app-work")


@pytest.fixture(scope="session")
def serve_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def genserve_url(ray_cluster, serve_port: int, app_work_dir: Path) -> str:
    """Base URL of the whole app (configs/local.yaml) served by the shared cluster."""
    from serve_app import launcher

    doc = local_config_doc(serve_port, app_work_dir)
    launcher.deploy(doc)
    launcher.wait_running(doc["applications"][0]["name"], timeout_s=300)
    return f"http://127.0.0.1:{serve_port}"


@pytest.fixture(scope="session")
def api_key(genserve_url: str, app_work_dir: Path) -> str:
    """The `local` tenant's key (top plan), written by the ingress at start-up."""
    return (app_work_dir / "local_api_key").read_text().strip()


@pytest.fixture(scope="session")
def auth(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}
