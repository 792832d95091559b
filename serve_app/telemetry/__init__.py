"""The ingress's half of telemetry: the HTTP middleware (middleware.py) and `genserve status`
(status.py). Everything a model replica also needs (config, metrics, tracing, JSON logs, request
context) lives in the top-level `telemetry` package, which knows nothing about HTTP; it is
re-exported here so the application has one place to import telemetry from."""

from telemetry import (
                       CATALOGUE,
                       GENSERVE_METRICS,
                       RAY_METRICS,
                       MetricSpec,
                       TelemetryConfig,
                       catalog,
                       context,
                       exposed_names,
                       metrics,
                       setup_telemetry,
                       telemetry_of,
                       tracing,
)

__all__ = ["CATALOGUE", "GENSERVE_METRICS", "RAY_METRICS", "MetricSpec", "TelemetryConfig", "catalog", "context",
           "exposed_names", "metrics", "setup_telemetry", "telemetry_of", "tracing"]
