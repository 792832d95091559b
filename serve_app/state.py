"""What a request handler can reach: one `Services` object per ingress replica.

The ingress builds it at start-up (`serve_app.ingress.assemble_services`) and stores it on
`app.state.services`; routers get it through the `ServicesDep` dependency instead of importing
globals, so tests can build their own. Each feature service is a typed field; one a test leaves
out is None, and the route that needs it says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

if TYPE_CHECKING:
    from serve_app.adapters.registry import AdapterRegistry
    from serve_app.config import AppConfig
    from serve_app.images.service import ImagesService
    from serve_app.jobs.service import Jobs
    from serve_app.library import Library
    from serve_app.storage import ResultStore
    from serve_app.tenancy import Tenancy


@dataclass
class Services:
    config: AppConfig
    # Serve DeploymentHandles keyed by model name (the public `model` field).
    diffusion: dict[str, Any] = field(default_factory=dict)
    llm: dict[str, Any] = field(default_factory=dict)
    tenancy: Tenancy | None = None
    storage: ResultStore | None = None
    library: Library | None = None
    images: ImagesService | None = None
    jobs: Jobs | None = None
    adapters: AdapterRegistry | None = None


async def get_services(request: Request) -> Services:
    # `async def` for every dependency that does no I/O: FastAPI runs a plain `def` one in a
    # worker thread, a hop that cost ~0.5 ms per dependency per request on a busy replica.
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
