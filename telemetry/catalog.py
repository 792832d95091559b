"""Every metric name genserve's dashboards and alerts may use, with its type and tag keys.

Two sources:
- genserve's own metrics, registered by the graph through `ray.serve.metrics` (which adds the
  reserved tags `deployment`, `replica`, `application`; `route` is filled from the request);
- Ray's built-ins that the dashboard and alerts read (Serve proxy/router/controller metrics and
  the node reporter's GPU memory).

Ray exports every metric on each node's Prometheus endpoint (`metrics-export-port`, 8080 in
`kuberay/rayservice.yaml`) with a `ray_` prefix; counters gain `_total` (a name that already ends
in `_total` keeps it) and histograms expose `_bucket`, `_sum` and `_count` (checked against a live
endpoint by tests/test_telemetry_metrics.py). Ray 2.60 ships histograms to its agent as bucket
counts and rebuilds `_sum` from bucket midpoints: buckets and `_count` are exact, a mean from
`_sum / _count` is only as fine as the buckets (a batch of 4 counts as 3.5). Built-in names were
read from Ray 2.60's source (`serve/_private/request_ingress_metrics.py`, `router.py`,
`deployment_state.py`, `application_state.py`, `dashboard/modules/reporter/reporter_agent.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricType = Literal["counter", "gauge", "histogram"]
Source = Literal["genserve", "ray", "prometheus"]

RAY_PREFIX = "ray_"
# Tags that `ray.serve.metrics` sets itself and refuses in tag_keys.
SERVE_RESERVED_TAGS = frozenset({"deployment", "replica", "application"})
# Seconds; covers a 5 ms auth check up to a 10 min image job.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
TOKEN_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


@dataclass(frozen=True)
class MetricSpec:
    type: MetricType
    description: str
    tag_keys: tuple[str, ...]
    source: Source = "genserve"
    # Histogram bucket boundaries (genserve histograms only: Ray's have their own).
    boundaries: tuple[float, ...] = ()

    def exposed_names(self, name: str) -> tuple[str, ...]:
        """The series names Prometheus stores for the metric registered as `name`."""
        base = name if self.source == "prometheus" else RAY_PREFIX + name
        if self.type == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        if self.type == "counter" and not base.endswith("_total"):
            return (f"{base}_total",)
        return (base,)


def _g(type_: MetricType, description: str, tags: tuple[str, ...], boundaries: tuple[float, ...] = ()) -> MetricSpec:
    return MetricSpec(type_, description, tags, "genserve", boundaries)


def _ray(type_: MetricType, description: str, tags: tuple[str, ...]) -> MetricSpec:
    return MetricSpec(type_, description, tags, "ray")


# name as registered (no `ray_` prefix, no `_bucket`/`_total` added by the exporter) -> spec
GENSERVE_METRICS: dict[str, MetricSpec] = {
    "genserve_request_latency_seconds": _g(
        "histogram", "End-to-end latency of an API request (a stream: until its last byte), by route, model, "
        "HTTP status and tenant label (telemetry/tenant_label.py: bounded). Its _count by status gives the "
        "error rate.", ("route", "model", "status", "tenant"), LATENCY_BUCKETS_S),
    "genserve_requests_in_flight": _g(
        "gauge", "Requests admitted and not yet settled (queued for or running on a replica, or streaming), "
        "per ingress replica: sum over replicas. The queue by model and tenant; replicas queue tenant-blind. "
        "route is the admission's (chat, completions, images, jobs).",
        ("route", "model", "tenant")),
    "genserve_gpu_seconds_total": _g(
        "counter", "Measured GPU-seconds of settled requests (images: share of the batch's compute time; LLM: "
        "share clock times the replica's num_gpus, 1 per replica on CPU).", ("model", "tenant")),
    "genserve_gpu_cost_usd_total": _g(
        "counter", "GPU cost of settled requests: GPU-seconds times the model's tenancy.gpu_cost rate / 3600.",
        ("model", "tenant")),
    "genserve_billed_usd_total": _g(
        "counter", "Priced amount of settled requests (tenancy.prices): what tenants are charged.",
        ("model", "tenant")),
    "genserve_images_generated_total": _g(
        "counter", "Images returned to clients.", ("model", "tenant")),
    "genserve_batch_size": _g(
        "histogram", "Requests in each diffusion batch the GPU ran.", ("model",), BATCH_SIZE_BUCKETS),
    "genserve_queue_wait_seconds": _g(
        "histogram", "Time a request waited in the @serve.batch queue before its batch started.",
        ("model",), LATENCY_BUCKETS_S),
    "genserve_diffusion_step_seconds": _g(
        "histogram", "Wall time of one denoising step of a batch.", ("model",), STEP_BUCKETS_S),
    "genserve_tokens_total": _g(
        "counter", "LLM tokens processed; direction=in (prompt) or out (completion).",
        ("model", "tenant", "direction")),
    "genserve_ttft_seconds": _g(
        "histogram", "Time to first token of a chat/completion request.", ("model",), TOKEN_LATENCY_BUCKETS_S),
    "genserve_inter_token_latency_seconds": _g(
        "histogram", "Time between consecutive streamed tokens.", ("model",), TOKEN_LATENCY_BUCKETS_S),
    "genserve_tenant_requests_total": _g(
        "counter", "API requests accepted per tenant and route.", ("tenant", "route")),
    "genserve_rate_limited_total": _g(
        "counter", "Requests rejected with 429, by tenant and the limit that refused: requests, tokens, "
        "images (per window), concurrency, budget.", ("tenant", "kind")),
    "genserve_admission_overlap_total": _g(
        "counter", "Streamed LLM requests whose admission ran while the replica started them, by outcome: "
        "admitted, or refused (the generation was cancelled before any token).", ("outcome",)),
    "genserve_job_transitions_total": _g(
        "counter", "Async job state transitions, counted by the state entered.", ("state",)),
    "genserve_jobs_in_state": _g(
        "gauge", "Async jobs in each state, from the app database; every ingress replica reports the same "
        "count, so aggregate with max, not sum.", ("state",)),
    "genserve_degraded_requests_total": _g(
        "counter", "Images generated with fewer denoising steps than asked (adaptive quality), by reason: "
        "`load` (the replica was busy).", ("model", "reason")),
}

# dashboard/consts.py GPU_TAG_KEYS in Ray 2.60.
GPU_TAGS = ("ip", "Version", "SessionName", "IsHeadNode", "RayNodeType", "GpuDeviceName", "GpuIndex", "GpuUuid")

RAY_METRICS: dict[str, MetricSpec] = {
    "serve_num_http_requests": _ray(
        "counter", "HTTP requests processed by the Serve proxies.", ("route", "method", "application", "status_code")),
    "serve_num_http_error_requests": _ray(
        "counter", "HTTP responses with an error status.", ("route", "error_code", "method", "application")),
    "serve_http_request_latency_ms": _ray(
        "histogram", "End-to-end HTTP latency measured at the proxy (ms).",
        ("method", "route", "application", "status_code")),
    "serve_num_ongoing_http_requests": _ray(
        "gauge", "Requests in flight in each proxy.", ("node_id", "node_ip_address")),
    "serve_deployment_queued_queries": _ray(
        "gauge", "Requests queued in a handle's router, not yet assigned to a replica.",
        ("deployment", "application", "handle", "actor_id")),
    "serve_num_ongoing_requests_at_replicas": _ray(
        "gauge", "Requests a router has assigned to replicas and not yet finished.",
        ("deployment", "application", "handle", "actor_id")),
    "serve_replica_processing_queries": _ray(
        "gauge", "Requests executing in a replica.", ("deployment", "replica", "application")),
    "serve_deployment_replica_healthy": _ray(
        "gauge", "1 per healthy replica, 0 per unhealthy one.", ("deployment", "replica", "application")),
    "serve_health_check_failures_total": _ray(
        "counter", "Failed replica health checks (check_health raised or timed out).",
        ("deployment", "replica", "application")),
    "serve_deployment_status": _ray(
        "gauge", "Deployment status: 0 UNKNOWN, 1 DEPLOY_FAILED, 2 UNHEALTHY, 3 UPDATING, 4 UPSCALING, "
        "5 DOWNSCALING, 6 HEALTHY.", ("deployment", "application")),
    "serve_application_status": _ray(
        "gauge", "Application status: 0 UNKNOWN, 1 DEPLOY_FAILED, 2 UNHEALTHY, 3 NOT_STARTED, 4 DELETING, "
        "5 DEPLOYING, 6 RUNNING.", ("application",)),
    "serve_autoscaling_target_replicas": _ray(
        "gauge", "Replicas the Serve autoscaler currently targets.", ("deployment", "application")),
    "node_gram_used": _ray(
        "gauge", "GPU memory used per GPU (MiB, despite the 'bytes' unit Ray declares).",
        GPU_TAGS),
    "node_gram_available": _ray(
        "gauge", "GPU memory free per GPU (MiB).", GPU_TAGS),
    "node_gpus_utilization": _ray(
        "gauge", "GPU utilisation per GPU (percent).", GPU_TAGS),
}

PROMETHEUS_METRICS: dict[str, MetricSpec] = {
    "up": MetricSpec("gauge", "1 if Prometheus scraped the target, 0 if not.", ("job", "instance"), "prometheus"),
}

CATALOGUE: dict[str, MetricSpec] = {**GENSERVE_METRICS, **RAY_METRICS, **PROMETHEUS_METRICS}


def exposed_names() -> dict[str, str]:
    """Every series name Prometheus can hold -> the catalogue name it comes from."""
    return {exposed: name for name, spec in CATALOGUE.items() for exposed in spec.exposed_names(name)}
