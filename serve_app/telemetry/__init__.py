"""Telemetry: the metric catalogue (names the dashboards and alerts rely on)."""

from serve_app.telemetry.catalog import CATALOGUE, GENSERVE_METRICS, RAY_METRICS, MetricSpec, exposed_names

__all__ = ["CATALOGUE", "GENSERVE_METRICS", "RAY_METRICS", "MetricSpec", "exposed_names"]
