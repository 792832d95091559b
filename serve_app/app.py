"""The FastAPI application of one ingress replica, built from typed config and services."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from serve_app import playground
from serve_app.adapters.router import router as adapters_router
from serve_app.api import health, models
from serve_app.chat import router as chat
from serve_app.errors import install_error_handlers
from serve_app.images import router as images
from serve_app.jobs import router as jobs
from serve_app.library import library_router
from serve_app.middleware import RequestGuard
from serve_app.state import Services
from serve_app.storage import files_router
from serve_app.telemetry.middleware import TelemetryMiddleware
from serve_app.tenancy import admin_router, usage_router
from serve_app.text_guard import reject_invalid_text
from serve_app.trusted_hosts import TrustedHosts

ROUTERS = (health.router, models.router, images.router, chat.router, jobs.router, library_router, files_router,
           admin_router, usage_router, adapters_router, playground.router)


def create_app(services: Services) -> FastAPI:
    # Every route first refuses text that can't be stored or encoded (lone surrogates, NUL): 400
    # naming the field, before auth, admission or any storage.
    app = FastAPI(title="genserve", version="0.1.0", docs_url="/docs", redoc_url=None,
                  dependencies=[Depends(reject_invalid_text)])
    app.state.services = services
    install_error_handlers(app)
    # Adapter archives are the one upload: multipart, up to adapters.max_upload_mb (+ form overhead).
    app.add_middleware(RequestGuard, max_body_bytes=services.config.limits.max_body_bytes,
                       uploads={"/v1/adapters": services.config.adapters.max_upload_bytes + 64 * 1024})
    if services.config.trusted_hosts is not None:
        app.add_middleware(TrustedHosts, allowed_hosts=services.config.trusted_hosts)
    # Outermost: request id, root span, latency and access log also for what the guard rejects.
    app.add_middleware(TelemetryMiddleware, access_log=services.config.telemetry.access_log)
    for r in ROUTERS:
        app.include_router(r)
    return app
