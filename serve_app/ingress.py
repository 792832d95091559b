"""The HTTP ingress deployment: CPU only, owns the public API, calls model deployments by handle."""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from serve_app.app import create_app
from serve_app.config import AppConfig
from serve_app.prompts.render import ConfigTemplates
from serve_app.state import Services

logger = logging.getLogger("genserve.ingress")


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=256,
    max_queued_requests=1024,
    health_check_period_s=10,
)
@serve.ingress()
class Ingress:
    def __init__(self, config: dict, diffusion: dict[str, Any], llm: dict[str, Any] | None = None) -> None:
        cfg = AppConfig.model_validate(config)
        self.services = Services(config=cfg, diffusion=dict(diffusion), llm=dict(llm or {}),
                                 templates=ConfigTemplates(cfg))

    def __serve_build_asgi_app__(self):
        return create_app(self.services)
