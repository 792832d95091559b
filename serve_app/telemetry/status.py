"""`genserve status`: deployments, replicas by state, ongoing/queued requests and health.

Status and replica states come from the Serve controller (`serve.status()`, what `/health`
reads); ongoing and queued requests from Serve's own gauges on each node's Prometheus endpoint
(`ray_serve_replica_processing_queries`, `ray_serve_deployment_queued_queries`), found through
`ray.nodes()` or given with `--metrics-url`. Exits 1 when the application or a deployment is not
healthy (the seed's ha_monitor.sh, as a CLI), so it can gate scripts and probes.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import click

HEALTHY_DEPLOYMENT = ("HEALTHY", "UPSCALING", "DOWNSCALING")


@dataclass
class DeploymentRow:
    name: str
    status: str
    replicas: dict[str, int]
    ongoing: float | None = None
    queued: float | None = None
    message: str = ""

    @property
    def healthy(self) -> bool:
        return self.status in HEALTHY_DEPLOYMENT and self.replicas.get("RUNNING", 0) > 0


@dataclass
class AppReport:
    app: str
    status: str
    deployments: list[DeploymentRow] = field(default_factory=list)
    metrics_error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.status == "RUNNING" and all(d.healthy for d in self.deployments)


def _value(x: object) -> str:
    return str(getattr(x, "value", x))


def metrics_urls() -> list[str]:
    """Every alive node's Prometheus endpoint, from the cluster's node table."""
    import ray

    urls = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port:
            urls.append(f"http://{node['NodeManagerAddress']}:{port}/metrics")
    return urls


def serve_load(urls: list[str], app: str, timeout_s: float = 5.0) -> dict[str, dict[str, float]]:
    """deployment -> {"ongoing": ..., "queued": ...}, summed over nodes, replicas and handles."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"ray_serve_replica_processing_queries": "ongoing", "ray_serve_deployment_queued_queries": "queued"}
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"ongoing": 0.0, "queued": 0.0})
    for url in urls:
        text = httpx.get(url, timeout=timeout_s).raise_for_status().text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = wanted.get(s.name)
                if key and s.labels.get("application") == app and "deployment" in s.labels:
                    out[s.labels["deployment"]][key] += s.value
    return dict(out)


def collect(app: str, metrics: list[str] | None = None) -> AppReport:
    from ray import serve

    status = serve.status()
    a = status.applications.get(app)
    if a is None:
        return AppReport(app, "NOT_FOUND")
    report = AppReport(app, _value(a.status))
    try:
        load = serve_load(metrics if metrics is not None else metrics_urls(), app)
    except Exception as e:  # noqa: BLE001 - status still shows what the controller knows
        load, report.metrics_error = {}, f"{type(e).__name__}: {e}"
    for name, d in sorted(a.deployments.items()):
        row = DeploymentRow(name, _value(d.status), {_value(k): v for k, v in d.replica_states.items()},
                            message=d.message or "")
        if name in load:
            row.ongoing, row.queued = load[name]["ongoing"], load[name]["queued"]
        elif not report.metrics_error:
            row.ongoing = row.queued = 0.0  # no series yet: nothing in flight
        report.deployments.append(row)
    return report


def render(report: AppReport) -> str:
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:g}"

    header = ("DEPLOYMENT", "STATUS", "REPLICAS", "ONGOING", "QUEUED", "HEALTH")
    rows = [(d.name, d.status, " ".join(f"{k}={v}" for k, v in sorted(d.replicas.items())) or "-",
             num(d.ongoing), num(d.queued), "ok" if d.healthy else "UNHEALTHY") for d in report.deployments]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"application {report.app}: {report.status} ({'healthy' if report.healthy else 'UNHEALTHY'})", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in [header, *rows]]
    for d in report.deployments:
        if not d.healthy and d.message:
            lines.append(f"  {d.name}: {d.message}")
    if report.metrics_error:
        lines.append(f"(ongoing/queued unavailable: {report.metrics_error})")
    return "\n".join(lines)


@click.command("status")
@click.option("--address", default="auto", show_default=True, help="Ray cluster to ask (ray.init address).")
@click.option("--app", "app", default="genserve", show_default=True, help="Serve application name.")
@click.option("--metrics-url", "metrics", multiple=True,
              help="Prometheus endpoint(s) to read Serve's queue gauges from (default: every node's).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def status(address: str, app: str, metrics: tuple[str, ...], as_json: bool) -> None:
    """Print the deployments of APP with replicas, load and health; exit 1 if unhealthy."""
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - shown to the operator
            raise click.ClickException(f"cannot connect to Ray at {address!r}: {e}") from None
    report = collect(app, list(metrics) if metrics else None)
    if as_json:
        click.echo(json.dumps({**asdict(report), "healthy": report.healthy}, indent=2))
    else:
        click.echo(render(report))
    if not report.healthy:
        sys.exit(1)
