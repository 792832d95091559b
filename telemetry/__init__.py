"""Telemetry: the metric catalogue (names the dashboards and alerts rely on), metrics, traces,
JSON logs, request context, and `setup_telemetry`, which each deployment calls once at start-up.

Its own top-level package, free of HTTP and tenancy, because the model replicas (`deployments/`)
use it as much as the ingress does; the ingress's HTTP middleware stays in `serve_app/telemetry`."""

from telemetry.catalog import CATALOGUE, GENSERVE_METRICS, RAY_METRICS, MetricSpec, exposed_names
from telemetry.config import TelemetryConfig, telemetry_of


def setup_telemetry(config: TelemetryConfig | None, *, component: str) -> TelemetryConfig:
    """JSON logs, the OTLP trace exporter when configured, and the metrics' tenant labels for this
    process (idempotent)."""
    from telemetry.logging import install_logging
    from telemetry.metrics import configure_tenant_labels
    from telemetry.tracing import configure_tracing

    cfg = config or TelemetryConfig()
    install_logging(component, json_logs=cfg.json_logs)
    configure_tracing(cfg, component=component)
    configure_tenant_labels(cfg.tenant_label)
    return cfg


__all__ = ["CATALOGUE", "GENSERVE_METRICS", "RAY_METRICS", "MetricSpec", "TelemetryConfig", "exposed_names",
           "setup_telemetry", "telemetry_of"]
