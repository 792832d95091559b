"""OpenTelemetry tracing: one trace per request across ingress → LLM → diffusion → storage.

Serve handle calls don't carry OpenTelemetry context, so the caller puts it into the request
object: `outgoing()` gives a W3C `traceparent` (plus the request id and tenant, for the replica's
logs) that goes into `ImageTask.trace_context` / `GenerationRequest.trace_context`; the replica
continues the trace with `continue_trace(name, task.trace_context)`.

Each process configures its own exporter (`configure_tracing`): OTLP/HTTP when
`TelemetryConfig.otlp_endpoint` is set; otherwise the tracer stays OpenTelemetry's no-op one
(spans are not recorded and a no-op span only passes its parent's context along).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from telemetry.config import TelemetryConfig
from telemetry.context import RequestInfo, bind_request, current_request, unbind_request

T = TypeVar("T")

_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()


@dataclass
class _ProcessTracer:
    """The process's tracer. OpenTelemetry's provider is per process by nature (every deployment
    class in a replica shares it, and Serve's local testing mode runs several in one process)."""

    provider: Any = None  # opentelemetry.sdk.trace.TracerProvider once configured
    tracer: Tracer = field(default_factory=trace.NoOpTracer)


_state = _ProcessTracer()


def traces_url(endpoint: str) -> str:
    """OTLP/HTTP wants the signal's path; a bare collector URL gets `/v1/traces`."""
    return endpoint.rstrip("/") + "/v1/traces" if urlsplit(endpoint).path in ("", "/") else endpoint


def configure_tracing(config: TelemetryConfig | None, *, component: str, exporter: Any = None) -> bool:
    """Give this process a real tracer: OTLP/HTTP to `config.otlp_endpoint`, or `exporter` (a
    SpanExporter, e.g. the SDK's InMemorySpanExporter in tests, exported synchronously).

    Without either, nothing changes: the tracer stays no-op (or what was configured before: with
    Serve's local testing mode several deployments share one process). Returns True if a tracer
    was installed by this call."""
    cfg = config or TelemetryConfig()
    if exporter is None and cfg.otlp_endpoint is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    with _lock:
        if _state.provider is not None and exporter is None:
            return False  # the first configuration of a process wins
        provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name, "genserve.component": component}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            assert cfg.otlp_endpoint is not None  # no exporter and no endpoint returned above
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(cfg.otlp_endpoint))))
        old = _state.provider
        _state.provider, _state.tracer = provider, provider.get_tracer("genserve")
    if old is not None:
        old.shutdown()
    return True


def reset_tracing() -> None:
    """Flush and drop this process's tracer (back to no-op)."""
    with _lock:
        old = _state.provider
        _state.provider, _state.tracer = None, trace.NoOpTracer()
    if old is not None:
        old.shutdown()


def force_flush(timeout_ms: int = 5000) -> None:
    if _state.provider is not None:
        _state.provider.force_flush(timeout_ms)


def _attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    # OpenTelemetry takes str/bool/int/float; genserve's own keys get a `genserve.` namespace.
    return {(k if "." in k else f"genserve.{k}"): v for k, v in attrs.items() if v is not None}


@contextmanager
def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, parent: Any = None, **attrs: Any) -> Iterator[Span]:
    """A span, current for the block (a child of the current span unless `parent` is a Context)."""
    with _state.tracer.start_as_current_span(name, context=parent, kind=kind, attributes=_attrs(attrs)) as s:
        yield s


def set_attrs(s: Span, **attrs: Any) -> None:
    if s.is_recording():
        s.set_attributes(_attrs(attrs))


async def traced(awaitable: Awaitable[T], name: str, **attrs: Any) -> T:
    """Await `awaitable` inside a span (e.g. a background task: `create_task(traced(...))`)."""
    with span(name, **attrs):
        return await awaitable


# -- across Serve handle calls ----------------------------------------------------------------

def outgoing() -> dict[str, str] | None:
    """The `trace_context` for a request object sent through a handle: W3C `traceparent` of the
    current span (when there is a valid one) and the request's id and tenant."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    info = current_request()
    if info is not None:
        carrier["request_id"] = info.request_id
        if info.tenant:
            carrier["tenant"] = info.tenant
    return carrier or None


def extract(carrier: Mapping[str, str] | None) -> Any:
    """The OpenTelemetry Context a carrier (trace_context, or HTTP headers) continues; None if none."""
    if not carrier or "traceparent" not in carrier:
        return None
    return _PROPAGATOR.extract(carrier)


@contextmanager
def continue_trace(name: str, carrier: Mapping[str, str] | None, **attrs: Any) -> Iterator[Span]:
    """In a replica: a SERVER span continuing the caller's trace, current for the block, with the
    caller's request id and tenant bound for logs."""
    info = RequestInfo(carrier["request_id"], carrier.get("tenant")) if carrier and "request_id" in carrier else None
    token = bind_request(info) if info is not None else None
    try:
        with span(name, kind=SpanKind.SERVER, parent=extract(carrier),
                  tenant=info.tenant if info else None, **attrs) as s:
            yield s
    finally:
        if token is not None:
            unbind_request(token)


def start_remote_span(name: str, carrier: Mapping[str, str] | None, **attrs: Any) -> Span:
    """Like `continue_trace` for an async generator (a stream): the span is not made current
    (contexts can't be entered and left across `yield`s safely); call `.end()` when done."""
    tenant = carrier.get("tenant") if carrier else None
    return _state.tracer.start_span(name, context=extract(carrier), kind=SpanKind.SERVER,
                              attributes=_attrs({"tenant": tenant, **attrs}))


def record_error(s: Span, exc: BaseException) -> None:
    if s.is_recording():
        s.record_exception(exc)
        s.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200])
