"""The HTTP ingress deployment: CPU only, owns the public API, calls model deployments by handle."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from serve_app.app import create_app
from serve_app.config import AppConfig, load_app_config
from serve_app.jobs.service import JOBS_KEY, Jobs
from serve_app.library import LIBRARY_KEY, Library
from serve_app.state import Services
from serve_app.storage import STORAGE_KEY, build_store
from telemetry import setup_telemetry, telemetry_of
from serve_app.tenancy import TENANCY_KEY, Tenancy, ensure_local_tenant
from serve_app.webhooks import WebhookSender

logger = logging.getLogger("genserve.ingress")


def build_services(cfg: AppConfig, diffusion: dict[str, Any], llm: dict[str, Any]) -> Services:
    """Per-replica state: DB engines can't be pickled, so they are made here, not in the builder."""
    tenancy = Tenancy(cfg.tenancy, work_dir=cfg.work_dir)  # runs `alembic upgrade head` under a lock
    if cfg.tenancy.local_tenant.enabled:
        ensure_local_tenant(tenancy)
    storage = build_store(cfg.storage, work_dir=cfg.work_dir, public_base_url=cfg.public_base_url)
    library = Library(tenancy.engine, cfg.templates)
    webhooks = WebhookSender(cfg.jobs.webhooks, work_dir=cfg.work_dir, engine=tenancy.engine)
    jobs = Jobs(config=cfg.jobs, tenancy=tenancy, storage=storage, diffusion=dict(diffusion), library=library,
                webhooks=webhooks)
    return Services(config=cfg, diffusion=dict(diffusion), llm=dict(llm),
                    extras={TENANCY_KEY: tenancy, STORAGE_KEY: storage, LIBRARY_KEY: library, JOBS_KEY: jobs})


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=256,
    max_queued_requests=1024,
    health_check_period_s=10,
)
@serve.ingress()
class Ingress:
    def __init__(self, config: AppConfig | dict, diffusion: dict[str, Any], llm: dict[str, Any] | None = None) -> None:
        cfg = load_app_config(config)
        setup_telemetry(telemetry_of(cfg), component="Ingress")
        self.services = build_services(cfg, diffusion, llm or {})
        # Leases, heartbeats and the reaper of async jobs run on this replica's event loop.
        self.services.extras[JOBS_KEY].runner.start()

    def __serve_build_asgi_app__(self):
        return create_app(self.services)

    async def check_health(self) -> None:
        """Unhealthy if the app database can't be reached: Serve then replaces this replica."""
        tenancy = self.services.extras[TENANCY_KEY]
        await asyncio.to_thread(tenancy.ping)
