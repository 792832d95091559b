"""Who and what the current request is about, for logs, metrics and spans.

One mutable `RequestInfo` per request in a ContextVar: the ingress middleware binds it, code that
learns more (authentication: the tenant; admission: the model) fills it in with `annotate`. Being
one object, it is also updated from worker threads (anyio copies the context, not the object) and
seen by background tasks started from the request (a job inherits its submitter's request id).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestInfo:
    request_id: str
    tenant: str | None = None
    # The tenant's bounded metrics label (telemetry/tenant_label.py); "" before authentication.
    tenant_label: str = ""
    model: str | None = None
    # The request's root span (the ingress HTTP span), so `annotate` can label it.
    span: Any = None
    # (phase, milliseconds) of the work before the response starts: sent as `Server-Timing`.
    phases: list[tuple[str, float]] = field(default_factory=list)


_current: ContextVar[RequestInfo | None] = ContextVar("genserve_request", default=None)


def current_request() -> RequestInfo | None:
    return _current.get()


def bind_request(info: RequestInfo | None) -> Token:
    return _current.set(info)


def unbind_request(token: Token) -> None:
    _current.reset(token)


def annotate(*, tenant: str | None = None, model: str | None = None, tenant_label: str | None = None) -> None:
    """Record the tenant (and its metrics label) and/or model of the current request (no-op outside
    a request)."""
    info = _current.get()
    if info is None:
        return
    if tenant is not None:
        info.tenant = tenant
    if tenant_label is not None:
        info.tenant_label = tenant_label
    if model is not None:
        info.model = model
    if info.span is not None and info.span.is_recording():
        if tenant is not None:
            info.span.set_attribute("genserve.tenant", tenant)
        if model is not None:
            info.span.set_attribute("genserve.model", model)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time one step of the current request (auth, admit, ...); it shows in the response's
    `Server-Timing` header when it ended before the response started (no-op outside a request)."""
    info = _current.get()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if info is not None:
            info.phases.append((name, (time.perf_counter() - t0) * 1000))
