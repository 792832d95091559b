"""What a request handler can reach: one `Services` object per ingress replica.

The ingress builds it at start-up and stores it on `app.state.services`; routers get it through
the `ServicesDep` dependency instead of importing globals, so tests can build their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

if TYPE_CHECKING:
    from serve_app.config import AppConfig


@dataclass
class Services:
    config: "AppConfig"
    # Serve DeploymentHandles keyed by model name (the public `model` field).
    diffusion: dict[str, Any] = field(default_factory=dict)
    llm: dict[str, Any] = field(default_factory=dict)
    # Feature services attach here as they land (tenancy, jobs, storage, templates...).
    extras: dict[str, Any] = field(default_factory=dict)


async def get_services(request: Request) -> Services:
    # `async def` for every dependency that does no I/O: FastAPI runs a plain `def` one in a
    # worker thread, a hop that cost ~0.5 ms per dependency per request on a busy replica.
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
