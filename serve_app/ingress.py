"""The HTTP ingress deployment: CPU only, owns the public API, calls model deployments by handle."""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from serve_app.app import create_app
from serve_app.config import AppConfig, load_app_config
from serve_app.prompts.render import ConfigTemplates
from serve_app.state import Services
from serve_app.tenancy import TENANCY_KEY, Tenancy, ensure_local_tenant

logger = logging.getLogger("genserve.ingress")


def build_services(cfg: AppConfig, diffusion: dict[str, Any], llm: dict[str, Any]) -> Services:
    """Per-replica state: DB engines can't be pickled, so they are made here, not in the builder."""
    tenancy = Tenancy(cfg.tenancy, work_dir=cfg.work_dir)  # runs `alembic upgrade head` under a lock
    if cfg.tenancy.local_tenant.enabled:
        ensure_local_tenant(tenancy)
    return Services(config=cfg, diffusion=dict(diffusion), llm=dict(llm), templates=ConfigTemplates(cfg),
                    extras={TENANCY_KEY: tenancy})


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
        self.services = build_services(load_app_config(config), diffusion, llm or {})

    def __serve_build_asgi_app__(self):
        return create_app(self.services)
