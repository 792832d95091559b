"""The HTTP ingress deployment: CPU only, owns the public API, calls model deployments by handle."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from ray import serve

from serve_app.adapters.registry import build_registry
from serve_app.app import create_app
from serve_app.chat.service import resolve_llm
from serve_app.config import AppConfig, load_app_config
from serve_app.images.service import ImagesService
from serve_app.jobs.service import Jobs
from serve_app.library import Library
from serve_app.state import Services
from serve_app.storage import ResultStore, build_store
from serve_app.tenancy import Tenancy, ensure_local_tenant
from serve_app.webhooks import WebhookSender
from telemetry import setup_telemetry, telemetry_of

logger = logging.getLogger("genserve.ingress")


def assemble_services(cfg: AppConfig, *, diffusion: dict[str, Any], llm: dict[str, Any], tenancy: Tenancy,
                      storage: ResultStore, library: Library, webhooks: WebhookSender | None = None) -> Services:
    """Wire the feature services over their collaborators, once (tests pass their own)."""
    services = Services(config=cfg, diffusion=dict(diffusion), llm=dict(llm), tenancy=tenancy, storage=storage,
                        library=library, adapters=build_registry(cfg, tenancy.engine, storage))
    services.images = ImagesService(config=cfg, diffusion=services.diffusion, tenancy=tenancy, library=library,
                                    storage=storage, resolve_llm=functools.partial(resolve_llm, services))
    services.jobs = Jobs(config=cfg.jobs, tenancy=tenancy, storage=storage, images=services.images,
                         webhooks=webhooks)
    return services


def build_services(cfg: AppConfig, diffusion: dict[str, Any], llm: dict[str, Any]) -> Services:
    """Per-replica state: DB engines can't be pickled, so they are made here, not in the builder."""
    tenancy = Tenancy(cfg.tenancy, work_dir=cfg.work_dir)  # runs `alembic upgrade head` under a lock
    if cfg.tenancy.local_tenant.enabled:
        ensure_local_tenant(tenancy)
    storage = build_store(cfg.storage, work_dir=cfg.work_dir, public_base_url=cfg.public_base_url)
    return assemble_services(cfg, diffusion=diffusion, llm=llm, tenancy=tenancy, storage=storage,
                             library=Library(tenancy.engine, cfg.templates),
                             webhooks=WebhookSender(cfg.jobs.webhooks, work_dir=cfg.work_dir, engine=tenancy.engine))


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
        assert self.services.jobs is not None
        self.services.jobs.runner.start()

    def __serve_build_asgi_app__(self):
        return create_app(self.services)

    async def check_health(self) -> None:
        """Unhealthy if the app database can't be reached: Serve then replaces this replica."""
        assert self.services.tenancy is not None
        await asyncio.to_thread(self.services.tenancy.ping)
