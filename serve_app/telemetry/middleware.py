"""The ingress's telemetry middleware: request id, the request's root span, latency, access log.

Pure ASGI (a Starlette-style class), outermost in the app so 413s and error responses are
counted too. Serve's proxy already accepts a client's `X-Request-ID` (or makes one), forwards it
in the request headers and returns it; without a proxy in front (tests, local mode) this
middleware makes one and returns it itself.

Every response carries `Server-Timing` (W3C): the phases timed with `context.phase` before the
response started (`auth`, `admit`, `llm`: until the LLM replica accepted the request, ...) and
`app`, the ingress's whole time to the response's start. A client's time to the first byte minus
`app` is what the hops outside the ingress cost (HTTP, Serve's proxy).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from opentelemetry.trace import SpanKind, StatusCode
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from telemetry import metrics, tracing
from telemetry.context import RequestInfo, bind_request, unbind_request

access_log = logging.getLogger("genserve.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def route_of(scope: Scope) -> str:
    """The matched route's template (`/v1/jobs/{job_id}`): bounded label values, no ids."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def server_timing(phases: list[tuple[str, float]], app_s: float) -> str:
    """`auth;dur=0.4, admit;dur=1.9, app;dur=6.3` (milliseconds, W3C Server-Timing)."""
    return ", ".join(f"{name};dur={ms:.2f}" for name, ms in [*phases, ("app", app_s * 1000)])


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp, *, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        info = RequestInfo(request_id=rid)
        token = bind_request(info)
        method, started, status = scope["method"], time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                out = MutableHeaders(scope=message)
                if not given:
                    out.append("X-Request-ID", rid)
                out.append("Server-Timing", server_timing(info.phases, time.perf_counter() - started))
            await send(message)

        try:
            with tracing.span(f"{method} {scope['path']}", kind=SpanKind.SERVER, parent=tracing.extract(headers),
                              request_id=rid, **{"http.request.method": method, "url.path": scope["path"]}) as span:
                info.span = span
                try:
                    await self.app(scope, receive, send_wrapper)
                finally:
                    route = route_of(scope)
                    seconds = time.perf_counter() - started
                    if span.is_recording():
                        span.update_name(f"{method} {route}")
                        span.set_attribute("http.route", route)
                        span.set_attribute("http.response.status_code", status)
                        if status >= 500:
                            span.set_status(StatusCode.ERROR)
                    metrics.record_request(route, info.model, status, seconds, info.tenant_label)
                    if self.access_log:
                        access_log.info("%s %s %d %.1fms", method, scope["path"], status, seconds * 1000,
                                        extra={"fields": {"route": route, "status": status,
                                                          "latency_ms": round(seconds * 1000, 2)}})
        finally:
            unbind_request(token)
