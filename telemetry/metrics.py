"""genserve's metrics, registered with `ray.serve.metrics` from the catalogue, and their recorders.

Ray exports them on every node's Prometheus endpoint as `ray_<name>` (see catalog.py), with
`deployment`, `replica` and `application` added by Serve inside a replica. Each process creates
its metric objects once, on first use; a record is one Cython call (~5-10 µs), never I/O. Outside
a Ray worker (unit tests, CLI) records go nowhere, so callers never need to check.

Where each is recorded:
  request_latency    ingress ASGI middleware (telemetry/middleware.py), route = route template
  tenant_requests    Tenancy.admit (accepted), rate_limited: Tenancy.admit (429, by limit kind)
  requests_in_flight Tenancy.admit (+1) and settle (-1): admitted, not yet settled
  gpu_seconds, gpu_cost_usd, billed_usd   Tenancy settle, beside images and tokens
  admission_overlap  the chat router, when a streamed request's admission overlapped its start
  images, tokens     Tenancy settle: what was delivered and billed, streamed and job usage included
  batch_size, queue_wait, diffusion_step   the diffusion replica (DiffusionServer's runner/progress)
  ttft, inter_token  the ingress chat service, on the SSE stream: what the client sees
  job_transitions    JobStore (each conditional UPDATE that took), jobs_in_state: the runner's reaper
  degraded_requests  the diffusion replica, per image that adaptive quality ran with fewer steps

Every `tenant` tag value is a bounded label (`tenant_label`, telemetry/tenant_label.py), never
simply the tenant's name.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from telemetry.catalog import GENSERVE_METRICS
from telemetry.config import TenantLabelConfig
from telemetry.tenant_label import TenantLabeler

_lock = threading.Lock()
# Metric objects are per process (Ray's metrics agent aggregates across replicas): created once,
# on first use, and shared by every deployment class in the process.
_registry: dict[str, Any] = {}


def _create() -> dict[str, Any]:
    from ray.serve import metrics as sm

    out: dict[str, Any] = {}
    # Ray annotates tag_keys as Tuple[str] (one key) where it takes any tuple of keys: ignore[arg-type].
    for name, spec in GENSERVE_METRICS.items():
        if spec.type == "counter":
            out[name] = sm.Counter(name, description=spec.description, tag_keys=spec.tag_keys)  # type: ignore[arg-type]
        elif spec.type == "gauge":
            out[name] = sm.Gauge(name, description=spec.description, tag_keys=spec.tag_keys)  # type: ignore[arg-type]
        else:
            out[name] = sm.Histogram(name, description=spec.description, boundaries=list(spec.boundaries),
                                     tag_keys=spec.tag_keys)  # type: ignore[arg-type]
    return out


def metric(name: str) -> Any:
    """The process's metric object registered as `name` (a GENSERVE_METRICS key)."""
    if not _registry:
        with _lock:
            if not _registry:
                _registry.update(_create())
    return _registry[name]


def _inc(name: str, value: float, tags: dict[str, str]) -> None:
    if value > 0:  # Ray refuses increments <= 0
        metric(name).inc(value, tags=tags)


# -- ingress ----------------------------------------------------------------------------------

class _ProcessTenantLabels:
    """This process's tenant labelling: one labeler, replaced (not mutated) when the config changes,
    so a label computed under the old config is never mixed with the new config's counts."""

    def __init__(self) -> None:
        self.labeler = TenantLabeler()

    def configure(self, config: TenantLabelConfig) -> None:
        if self.labeler.config != config:
            self.labeler = TenantLabeler(config)


_tenant_labels = _ProcessTenantLabels()


def configure_tenant_labels(config: TenantLabelConfig) -> None:
    """This process's tenant labelling (setup_telemetry calls it with the app's config)."""
    _tenant_labels.configure(config)


def tenant_label(tenant: str | None, plan: str | None) -> str:
    """The bounded `tenant` tag value of a tenant on `plan` (telemetry/tenant_label.py)."""
    return _tenant_labels.labeler.label(tenant, plan)


def record_request(route: str, model: str | None, status: int, seconds: float, tenant: str = "") -> None:
    """`tenant`: the request's tenant *label* ("" when it had none)."""
    metric("genserve_request_latency_seconds").observe(
        seconds, tags={"route": route, "model": model or "", "status": str(status), "tenant": tenant})


_in_flight: dict[tuple[str, str, str], int] = {}
_in_flight_lock = threading.Lock()


def change_in_flight(route: str, model: str, tenant: str, delta: int) -> None:
    """+1 when a request is admitted, -1 when it is settled (called from worker threads)."""
    key = (route, model, tenant)
    with _in_flight_lock:  # the set too: two threads must not publish their counts out of order
        n = _in_flight[key] = max(0, _in_flight.get(key, 0) + delta)
        metric("genserve_requests_in_flight").set(n, tags={"route": route, "model": model, "tenant": tenant})


def in_flight() -> dict[tuple[str, str, str], int]:
    """(route, model, tenant label) -> requests in flight in this process (a copy)."""
    with _in_flight_lock:
        return dict(_in_flight)


def record_tenant_request(tenant: str, route: str) -> None:
    _inc("genserve_tenant_requests_total", 1, {"tenant": tenant, "route": route})


def record_rate_limited(tenant: str, kind: str) -> None:
    """`kind`: requests, tokens, images, concurrency (the limit that refused) or budget."""
    _inc("genserve_rate_limited_total", 1, {"tenant": tenant, "kind": kind})


def record_admission_overlap(outcome: str) -> None:
    """`outcome`: admitted or refused."""
    _inc("genserve_admission_overlap_total", 1, {"outcome": outcome})


def record_usage(*, model: str, tenant: str, images: int = 0, prompt_tokens: int = 0,
                 completion_tokens: int = 0, gpu_seconds: float = 0.0, gpu_cost_usd: float = 0.0,
                 billed_usd: float = 0.0) -> None:
    """A settled request's usage; `tenant` is its label."""
    _inc("genserve_gpu_seconds_total", gpu_seconds, {"model": model, "tenant": tenant})
    _inc("genserve_gpu_cost_usd_total", gpu_cost_usd, {"model": model, "tenant": tenant})
    _inc("genserve_billed_usd_total", billed_usd, {"model": model, "tenant": tenant})
    _inc("genserve_images_generated_total", images, {"model": model, "tenant": tenant})
    _inc("genserve_tokens_total", prompt_tokens, {"model": model, "tenant": tenant, "direction": "in"})
    _inc("genserve_tokens_total", completion_tokens, {"model": model, "tenant": tenant, "direction": "out"})


def record_degraded(model: str, reason: str) -> None:
    """An image run with fewer steps than asked; `reason` is the degrade reason (only `load` today)."""
    _inc("genserve_degraded_requests_total", 1, {"model": model, "reason": reason})


class StreamTimer:
    """TTFT and inter-token latency of one streamed response, as its chunks leave the ingress.

    `sent(n)` once per chunk handed to the client: the first chunk with tokens gives TTFT (from
    the timer's creation, i.e. before the LLM was called); each later one gives the gap since the
    previous chunk divided by its tokens (chunks coalesce tokens, ~20 ms each): one observation
    per chunk, not per token."""

    __slots__ = ("_tags", "_start", "_last")

    def __init__(self, model: str) -> None:
        self._tags = {"model": model}
        self._start = time.perf_counter()
        self._last: float | None = None

    def sent(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.perf_counter()
        if self._last is None:
            metric("genserve_ttft_seconds").observe(now - self._start, tags=dict(self._tags))
        else:
            metric("genserve_inter_token_latency_seconds").observe((now - self._last) / num_tokens,
                                                                   tags=dict(self._tags))
        self._last = now


# -- diffusion replica ------------------------------------------------------------------------

def record_batch(model: str, group_sizes: Iterable[int], queue_waits: Iterable[float]) -> None:
    """One denoising call: the size of each group the engine ran, each request's queue wait."""
    for size in group_sizes:
        metric("genserve_batch_size").observe(size, tags={"model": model})
    for wait in queue_waits:
        metric("genserve_queue_wait_seconds").observe(wait, tags={"model": model})


def record_step(model: str, seconds: float) -> None:
    metric("genserve_diffusion_step_seconds").observe(seconds, tags={"model": model})


# -- jobs -------------------------------------------------------------------------------------

def record_job_transition(state: str) -> None:
    _inc("genserve_job_transitions_total", 1, {"state": state})


def set_jobs_in_state(counts: dict[str, int]) -> None:
    """The app DB's job counts (every ingress replica reports the same: aggregate with max)."""
    gauge = metric("genserve_jobs_in_state")
    for state, n in counts.items():
        gauge.set(n, tags={"state": state})
