"""The main dashboard's cost and model-by-tenant panels (issue 22): cost per tenant per day, cost
per 1k tokens and per image, latency percentiles / error rate / queue by model and tenant. Metric
names, PromQL parsing (promtool) and the catalogue are checked for every panel by test_dashboards.py."""

from __future__ import annotations

from test_dashboards import _panels, metric_names

from telemetry.catalog import GENSERVE_METRICS


def _exprs(title_part: str) -> list[str]:
    panels = [p for p in _panels() if title_part in p["title"]]
    assert len(panels) == 1, f"{title_part!r}: {[p['title'] for p in panels]}"
    return [t["expr"] for t in panels[0]["targets"]]


def test_cost_panels() -> None:
    (per_day,) = _exprs("GPU cost per tenant per day")
    assert per_day.startswith("sum by (tenant) (increase(") and "[1d]" in per_day
    assert metric_names(per_day) == {"ray_genserve_gpu_cost_usd_total"}
    (billed,) = _exprs("Billed per tenant per day")
    assert metric_names(billed) == {"ray_genserve_billed_usd_total"} and "[1d]" in billed
    gpu, price = _exprs("Cost per 1k tokens")
    assert gpu.startswith("1000 * ") and metric_names(gpu) == {"ray_genserve_gpu_cost_usd_total",
                                                               "ray_genserve_tokens_total"}
    assert metric_names(price) == {"ray_genserve_billed_usd_total", "ray_genserve_tokens_total"}
    gpu, price = _exprs("Cost per image")
    assert metric_names(gpu) == {"ray_genserve_gpu_cost_usd_total", "ray_genserve_images_generated_total"}
    assert metric_names(price) == {"ray_genserve_billed_usd_total", "ray_genserve_images_generated_total"}


def test_latency_errors_and_queue_by_model_and_tenant() -> None:
    lat = _exprs("Latency by model and tenant")
    assert [e.split(",")[0] for e in lat] == ["histogram_quantile(0.5", "histogram_quantile(0.95",
                                              "histogram_quantile(0.99"]
    assert all("sum by (model, tenant, le)" in e for e in lat)
    errors = _exprs("Error rate by model and tenant")
    assert 'status=~"5.."' in errors[0] and all(e.count("sum by (model, tenant)") == 2 for e in errors)
    (queue,) = _exprs("Queue by model and tenant")
    assert queue.startswith("sum by (model, tenant) (ray_genserve_requests_in_flight")
    for name in ("genserve_request_latency_seconds", "genserve_requests_in_flight"):
        assert {"model", "tenant"} <= set(GENSERVE_METRICS[name].tag_keys)
