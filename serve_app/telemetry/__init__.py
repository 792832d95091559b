"""Telemetry: the metric catalogue (names the dashboards and alerts rely on), metrics, traces,
JSON logs, and `setup_telemetry`, which each deployment calls once at start-up."""

from serve_app.telemetry.catalog import CATALOGUE, GENSERVE_METRICS, RAY_METRICS, MetricSpec, exposed_names
from serve_app.telemetry.config import TelemetryConfig, telemetry_of


def setup_telemetry(config: TelemetryConfig | dict | None, *, component: str) -> TelemetryConfig:
    """JSON logs and, when configured, the OTLP trace exporter for this process (idempotent)."""
    from serve_app.telemetry.logging import install_logging
    from serve_app.telemetry.tracing import configure_tracing

    cfg = config if isinstance(config, TelemetryConfig) else TelemetryConfig.model_validate(config or {})
    install_logging(component, json_logs=cfg.json_logs)
    configure_tracing(cfg, component=component)
    return cfg


__all__ = ["CATALOGUE", "GENSERVE_METRICS", "RAY_METRICS", "MetricSpec", "TelemetryConfig", "exposed_names",
           "setup_telemetry", "telemetry_of"]
