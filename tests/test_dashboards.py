"""configs/grafana/genserve.json and configs/prometheus/alerts.yaml: shape, PromQL sanity, and every
metric they name exists in telemetry/catalog.py. With `promtool` on PATH (Debian package
`prometheus`), the PromQL is parsed by Prometheus itself and the alerts are unit-tested on
synthetic series."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from telemetry.catalog import CATALOGUE, GENSERVE_METRICS, SERVE_RESERVED_TAGS, exposed_names

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "configs" / "grafana" / "genserve.json"
ALERTS = REPO / "configs" / "prometheus" / "alerts.yaml"
OPERATIONS = REPO / "docs" / "operations.md"
GPU_DASHBOARD = REPO / "configs" / "grafana" / "genserve-gpu.json"
ALERTMANAGER = REPO / "configs" / "prometheus" / "alertmanager.example.yaml"
# Metrics from exporters outside Ray (telemetry/catalog.py lists Ray's and genserve's): the name
# check takes these too, so a misspelt exporter metric still fails.
EXTERNAL_METRICS = {
    **dict.fromkeys(("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE",
                     "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_POWER_USAGE"), "dcgm-exporter (kuberay/dcgm-exporter.yaml)"),
    **dict.fromkeys(("kube_node_status_allocatable", "kube_node_status_condition", "kube_node_spec_unschedulable"),
                    "kube-state-metrics"),
    **dict.fromkeys(("kubelet_volume_stats_used_bytes", "kubelet_volume_stats_capacity_bytes"), "kubelet"),
}
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$application": "genserve"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict[str, Any]]:
    out = []
    for p in _dashboard()["panels"]:
        out += [p, *p.get("panels", [])]
    return [p for p in out if p["type"] != "row"]


def _rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p["targets"]]


def _all_exprs() -> list[str]:
    return _dashboard_exprs() + [r["expr"] for r in _rules()]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label
    names (inside {}, by/without/on/ignoring/group_* lists) or parts of strings and ranges."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\w+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def _balanced(expr: str) -> bool:
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in s:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack


def _slug(heading: str) -> str:
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


# ---- the parser used below ----------------------------------------------------------------------

def test_metric_name_parser() -> None:
    expr = ('histogram_quantile(0.95, sum by (route, le) (rate(ray_genserve_request_latency_seconds_bucket'
            '{application=~"$application", route!~"/v1/(a|b)"}[$__rate_interval]))) / on() group_left '
            'sum(ray_node_gram_used offset 5m) > bool 2 or absent(up{job="x"} == 1)')
    assert metric_names(expr) == {"ray_genserve_request_latency_seconds_bucket", "ray_node_gram_used", "up"}
    assert _balanced(expr) and not _balanced("sum(rate(x[5m])") and not _balanced("a{b=\"(\"]")


# ---- dashboard ----------------------------------------------------------------------------------

def test_dashboard_shape() -> None:
    d = _dashboard()
    assert d["uid"] and d["title"] and 36 <= d["schemaVersion"] <= 41
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert {v["name"] for v in d["templating"]["list"]} >= {"datasource", "application"}
    for p in _panels():
        assert p["title"] and p["targets"], f"panel {p['id']} has no targets"
        pos = p["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), f"{p['title']}/{t['refId']}: empty expr"
            assert p["datasource"]["uid"] == "${datasource}"


def test_dashboard_covers_the_brief() -> None:
    exprs = "\n".join(_dashboard_exprs())
    for needle in ("histogram_quantile(0.5,", "histogram_quantile(0.95,", "histogram_quantile(0.99,",
                   "ray_serve_num_http_requests_total", "ray_serve_deployment_queued_queries",
                   "ray_serve_deployment_replica_healthy", "ray_node_gram_used"):
        assert needle in exprs, needle
    used = set().union(*(metric_names(e) for e in _dashboard_exprs()))
    names = exposed_names()
    shown = {names[u] for u in used if u in names}
    missing = set(GENSERVE_METRICS) - shown
    assert not missing, f"genserve metrics without a panel: {sorted(missing)}"


# ---- alerts -------------------------------------------------------------------------------------

def test_alert_shape() -> None:
    rules = _rules()
    assert rules
    anchors = {_slug(line.lstrip("#")) for line in OPERATIONS.read_text().splitlines() if line.startswith("#")}
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for r in rules:
        assert r["expr"].strip() and re.fullmatch(r"\d+[smh]", str(r["for"])), r["alert"]
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
        ann = r["annotations"]
        assert ann["summary"] and ann["description"], r["alert"]
        doc, _, anchor = ann["runbook_url"].partition("#")
        assert doc == "docs/operations.md" and anchor in anchors, f"{r['alert']}: no section #{anchor}"


def test_seed_monitor_checks_are_alerts() -> None:
    names = {r["alert"] for r in _rules()}
    assert {"GenserveApplicationUnhealthy", "GenserveQueueHigh", "GenserveNoHealthyDiffusionReplica",
            "GenserveApiLatencyP95High", "GenserveGpuMemoryHigh",
            # seed 000's monitor: GPU nodes < 2, model disk > 85 %, no workers (chat as well as images)
            "GenserveGpuNodesLow", "GenserveModelVolumeFull", "GenserveNoHealthyLlmReplica",
            "GenserveReplicaRedundancyLost", "GenserveGpuTemperatureHigh"} <= names
    every_case = {t["alertname"] for case in ALERT_CASES for t in case["alert_rule_test"]}
    new = {"GenserveGpuNodesLow", "GenserveModelVolumeFull", "GenserveNoHealthyLlmReplica",
           "GenserveReplicaRedundancyLost", "GenserveGpuTemperatureHigh"}
    assert new <= every_case, f"no promtool unit test for {sorted(new - every_case)}"


# ---- the GPU dashboard (DCGM exporter, kube-state-metrics, kubelet) -----------------------------

GPU_GRAFANA_VARS = {**GRAFANA_VARS, "$node": ".*"}


def _gpu_panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(GPU_DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def _gpu_exprs() -> list[str]:
    return [t["expr"] for p in _gpu_panels() for t in p["targets"]]


def test_gpu_dashboard_shape_and_coverage() -> None:
    d = json.loads(GPU_DASHBOARD.read_text())
    assert d["uid"] != _dashboard()["uid"] and d["title"] and 36 <= d["schemaVersion"] <= 41
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in d["templating"]["list"]} >= {"datasource", "node"}
    for p in _gpu_panels():
        pos = p["gridPos"]
        assert p["title"] and p["targets"] and pos["x"] + pos["w"] <= 24, p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
    exprs = "\n".join(_gpu_exprs())
    for needle in ("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "kube_node_status_allocatable",
                   "kubelet_volume_stats_used_bytes", "ray_serve_deployment_replica_healthy"):
        assert needle in exprs, needle


@pytest.mark.parametrize("expr", _gpu_exprs())
def test_gpu_dashboard_expr_names(expr: str) -> None:
    assert _balanced(expr), expr
    unknown = metric_names(expr) - set(exposed_names()) - EXTERNAL_METRICS.keys()
    assert metric_names(expr) and not unknown, f"unknown metrics {sorted(unknown)} in {expr}"


# ---- Alertmanager routing example ---------------------------------------------------------------

amtool = shutil.which("amtool")
needs_amtool = pytest.mark.skipif(amtool is None, reason="amtool not on PATH (apt-get install prometheus-alertmanager)")


@needs_amtool
def test_alertmanager_example_is_valid() -> None:
    res = subprocess.run([amtool or "amtool", "check-config", str(ALERTMANAGER)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_amtool
def test_alertmanager_routes_every_alert() -> None:
    """Every rule's alert reaches a receiver: critical ones page, node/volume warnings go to the
    platform channel, other warnings to the service channel."""
    def route(labels: dict[str, str]) -> str:
        res = subprocess.run([amtool or "amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER}",
                              *(f"{k}={v}" for k, v in labels.items())], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    platform = {"GenserveGpuTemperatureHigh", "GenserveModelVolumeFull", "GenserveGpuMemoryHigh"}
    for r in _rules():
        got = route({"alertname": r["alert"], **r["labels"]})
        severity = r["labels"]["severity"]
        want = ("genserve-pager" if severity == "critical" else "platform-chat" if r["alert"] in platform
                else "genserve-chat")
        assert got == want, f"{r['alert']} ({severity}) routed to {got}"


# ---- both -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("expr", _all_exprs())
def test_expr_sanity_and_names_in_catalogue(expr: str) -> None:
    assert _balanced(expr), f"unbalanced brackets: {expr}"
    names = metric_names(expr)
    assert names, f"no metric in: {expr}"
    unknown = names - set(exposed_names()) - EXTERNAL_METRICS.keys()
    assert not unknown, f"not in telemetry/catalog.py (nor EXTERNAL_METRICS): {sorted(unknown)} in {expr}"


def test_catalogue() -> None:
    for name, spec in CATALOGUE.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        if spec.source == "genserve":
            assert name.startswith("genserve_") and not SERVE_RESERVED_TAGS & set(spec.tag_keys), name
            assert spec.type != "counter" or name.endswith("_total"), name
            assert spec.type != "histogram" or list(spec.boundaries) == sorted(set(spec.boundaries)), name
    assert CATALOGUE["genserve_request_latency_seconds"].exposed_names("genserve_request_latency_seconds") == (
        "ray_genserve_request_latency_seconds_bucket", "ray_genserve_request_latency_seconds_sum",
        "ray_genserve_request_latency_seconds_count")
    assert CATALOGUE["serve_num_http_requests"].exposed_names("serve_num_http_requests") == (
        "ray_serve_num_http_requests_total",)
    assert CATALOGUE["serve_health_check_failures_total"].exposed_names("serve_health_check_failures_total") == (
        "ray_serve_health_check_failures_total",)
    assert CATALOGUE["genserve_tokens_total"].tag_keys == ("model", "tenant", "direction")


# ---- promtool: Prometheus's own parser and rule unit tests --------------------------------------

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not on PATH (apt-get install prometheus)")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool or "promtool", *args], capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_checks_alerts() -> None:
    res = _promtool("check", "rules", str(ALERTS))
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_parses_dashboard_queries(tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = _promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


HEALTHY = 'ray_serve_deployment_replica_healthy{application="genserve",deployment="%s",replica="%s"}'
GRAM = 'ray_node_gram_%s{ip="10.0.0.7",GpuIndex="0"}'
LAT = 'ray_genserve_request_latency_seconds_bucket{application="genserve",route="/v1/models",le="%s"}'
ALLOC = 'kube_node_status_allocatable{job="kube-state-metrics",node="%s",resource="%s",unit="integer"}'
READY = 'kube_node_status_condition{job="kube-state-metrics",node="%s",condition="Ready",status="true"}'
UNSCHED = 'kube_node_spec_unschedulable{job="kube-state-metrics",node="%s"}'
VOL = 'kubelet_volume_stats_%s_bytes{job="kubelet",namespace="genserve",persistentvolumeclaim="%s"}'
TEMP = 'DCGM_FI_DEV_GPU_TEMP{Hostname="gpu-node-1",gpu="%s",UUID="GPU-x",pod="genserve-x7k2p-gpu-worker-abcde"}'
ALERT_CASES: list[dict[str, Any]] = [
    {"interval": "1m",
     "input_series": [{"series": HEALTHY % ("Diffusion-sdxl", "r1"), "values": "1 1 0 0 0 0 0"},
                      {"series": HEALTHY % ("Diffusion-wuerstchen", "r2"), "values": "1 1 1 1 1 1 1"}],
     "alert_rule_test": [
         {"eval_time": "2m", "alertname": "GenserveNoHealthyDiffusionReplica", "exp_alerts": []},
         {"eval_time": "5m", "alertname": "GenserveNoHealthyDiffusionReplica",
          "exp_alerts": [{"exp_labels": {"severity": "critical", "deployment": "Diffusion-sdxl"}}]}]},
    {"interval": "1m",  # no diffusion replica reports at all
     "input_series": [{"series": HEALTHY % ("Ingress", "r0"), "values": "1x5"}],
     "alert_rule_test": [{"eval_time": "3m", "alertname": "GenserveNoHealthyDiffusionReplica",
                          "exp_alerts": [{"exp_labels": {"severity": "critical", "application": "genserve"}}]}]},
    {"interval": "1m",
     "input_series": [{"series": 'ray_serve_deployment_queued_queries{application="genserve",deployment='
                                 '"Diffusion-sdxl",handle="h",actor_id="a"}', "values": "150x10"}],
     "alert_rule_test": [
         {"eval_time": "3m", "alertname": "GenserveQueueHigh", "exp_alerts": []},
         {"eval_time": "7m", "alertname": "GenserveQueueHigh",
          "exp_alerts": [{"exp_labels": {"severity": "warning", "deployment": "Diffusion-sdxl"}}]},
         {"eval_time": "7m", "alertname": "GenserveQueueCritical", "exp_alerts": []}]},
    {"interval": "1m",  # 75,000 of 80,000 MiB used: 93.75 %
     "input_series": [{"series": GRAM % "used", "values": "75000x20"},
                      {"series": GRAM % "available", "values": "5000x20"}],
     "alert_rule_test": [
         {"eval_time": "12m", "alertname": "GenserveGpuMemoryHigh",
          "exp_alerts": [{"exp_labels": {"severity": "warning", "ip": "10.0.0.7", "GpuIndex": "0"}}]},
         {"eval_time": "12m", "alertname": "GenserveGpuMemoryCritical", "exp_alerts": []}]},
    {"interval": "1m",  # blue cluster RUNNING (6) while green is UNHEALTHY (2): no page
     "input_series": [
         {"series": 'ray_serve_application_status{application="genserve",ray_io_cluster="blue"}', "values": "6x10"},
         {"series": 'ray_serve_application_status{application="genserve",ray_io_cluster="green"}', "values": "2x10"}],
     "alert_rule_test": [{"eval_time": "5m", "alertname": "GenserveApplicationUnhealthy", "exp_alerts": []}]},
    {"interval": "1m",
     "input_series": [{"series": 'ray_serve_application_status{application="genserve"}', "values": "6 6 2 2 2 2 2"}],
     "alert_rule_test": [{"eval_time": "5m", "alertname": "GenserveApplicationUnhealthy",
                          "exp_alerts": [{"exp_labels": {"severity": "critical", "application": "genserve"}}]}]},
    {"interval": "1m",  # every /v1/models request takes 1-5 s: p95 = 4.8 s
     "input_series": [{"series": LAT % "1", "values": "0x20"},
                      {"series": LAT % "5", "values": "0+10x20"},
                      {"series": LAT % "+Inf", "values": "0+10x20"}],
     "alert_rule_test": [{"eval_time": "16m", "alertname": "GenserveApiLatencyP95High",
                          "exp_alerts": [{"exp_labels": {"severity": "warning", "route": "/v1/models"}}]}]},
    # ---- seed 000's monitor checks as rules --------------------------------------------------------
    {"interval": "1m",  # three GPU nodes; c goes NotReady at 2m, b is cordoned at 7m: one left
     "input_series": [
         *({"series": ALLOC % (n, "nvidia_com_gpu"), "values": "1x20"} for n in "abc"),
         {"series": ALLOC % ("cpu-1", "cpu"), "values": "8x20"},  # a CPU node: never counted
         {"series": READY % "a", "values": "1x20"}, {"series": READY % "b", "values": "1x20"},
         {"series": READY % "c", "values": "1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0"},
         {"series": READY % "cpu-1", "values": "1x20"},
         {"series": UNSCHED % "a", "values": "0x20"}, {"series": UNSCHED % "c", "values": "0x20"},
         {"series": UNSCHED % "b", "values": "0 0 0 0 0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1"}],
     "alert_rule_test": [
         {"eval_time": "6m", "alertname": "GenserveGpuNodesLow", "exp_alerts": []},
         {"eval_time": "10m", "alertname": "GenserveGpuNodesLow", "exp_alerts": []},  # `for: 5m`
         {"eval_time": "13m", "alertname": "GenserveGpuNodesLow",
          "exp_alerts": [{"exp_labels": {"severity": "critical"}}]}]},
    {"interval": "1m",  # no GPU node at all (count() of nothing): still fires
     "input_series": [{"series": ALLOC % ("cpu-1", "cpu"), "values": "8x10"},
                      {"series": READY % "cpu-1", "values": "1x10"}],
     "alert_rule_test": [{"eval_time": "6m", "alertname": "GenserveGpuNodesLow",
                          "exp_alerts": [{"exp_labels": {"severity": "critical"}}]}]},
    {"interval": "1m",  # a GPU pod's model cache at 90 %; another at 50 %; the GCS Redis volume is not a model volume
     "input_series": [
         {"series": VOL % ("used", "genserve-x7k2p-gpu-worker-abcde-models"), "values": "45e9x20"},
         {"series": VOL % ("capacity", "genserve-x7k2p-gpu-worker-abcde-models"), "values": "50e9x20"},
         {"series": VOL % ("used", "genserve-x7k2p-gpu-llm-worker-fghij-models"), "values": "25e9x20"},
         {"series": VOL % ("capacity", "genserve-x7k2p-gpu-llm-worker-fghij-models"), "values": "50e9x20"},
         {"series": VOL % ("used", "data-genserve-gcs-redis-0"), "values": "9.9e9x20"},
         {"series": VOL % ("capacity", "data-genserve-gcs-redis-0"), "values": "10e9x20"}],
     "alert_rule_test": [
         {"eval_time": "5m", "alertname": "GenserveModelVolumeFull", "exp_alerts": []},
         {"eval_time": "12m", "alertname": "GenserveModelVolumeFull",
          "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "genserve",
                                         "persistentvolumeclaim": "genserve-x7k2p-gpu-worker-abcde-models"}}]}]},
    {"interval": "1m",  # both LLM replicas go unhealthy at 2m
     "input_series": [{"series": HEALTHY % ("LLM-llama-3.1-8b-instruct", "r1"), "values": "1 1 0 0 0 0 0"},
                      {"series": HEALTHY % ("LLM-llama-3.1-8b-instruct", "r2"), "values": "1 1 0 0 0 0 0"},
                      {"series": HEALTHY % ("Diffusion-sdxl", "r3"), "values": "1x6"}],
     "alert_rule_test": [
         {"eval_time": "2m", "alertname": "GenserveNoHealthyLlmReplica", "exp_alerts": []},
         {"eval_time": "4m", "alertname": "GenserveNoHealthyLlmReplica",
          "exp_alerts": [{"exp_labels": {"severity": "critical", "deployment": "LLM-llama-3.1-8b-instruct"}}]},
         {"eval_time": "4m", "alertname": "GenserveNoHealthyDiffusionReplica", "exp_alerts": []}]},
    {"interval": "1m",  # no LLM replica reports at all (its GPU group never came up)
     "input_series": [{"series": HEALTHY % ("Diffusion-sdxl", "r3"), "values": "1x6"}],
     "alert_rule_test": [{"eval_time": "3m", "alertname": "GenserveNoHealthyLlmReplica",
                          "exp_alerts": [{"exp_labels": {"severity": "critical", "application": "genserve"}}]}]},
    {"interval": "1m",  # SDXL loses one of its two replicas at 2m (a node); Würstchen keeps both
     "input_series": [{"series": HEALTHY % ("Diffusion-sdxl", "r1"), "values": "1x20"},
                      {"series": HEALTHY % ("Diffusion-sdxl", "r2"), "values": "1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0"},
                      {"series": HEALTHY % ("Diffusion-wuerstchen", "r3"), "values": "1x20"},
                      {"series": HEALTHY % ("Diffusion-wuerstchen", "r4"), "values": "1x20"}],
     "alert_rule_test": [
         {"eval_time": "8m", "alertname": "GenserveReplicaRedundancyLost", "exp_alerts": []},  # a replacement's time
         {"eval_time": "13m", "alertname": "GenserveReplicaRedundancyLost",
          "exp_alerts": [{"exp_labels": {"severity": "warning", "deployment": "Diffusion-sdxl"}}]}]},
    {"interval": "1m",  # GPU 0 at 88 °C, GPU 1 at 70 °C
     "input_series": [{"series": TEMP % "0", "values": "88x20"}, {"series": TEMP % "1", "values": "70x20"}],
     "alert_rule_test": [
         {"eval_time": "5m", "alertname": "GenserveGpuTemperatureHigh", "exp_alerts": []},
         {"eval_time": "12m", "alertname": "GenserveGpuTemperatureHigh",
          "exp_alerts": [{"exp_labels": {"severity": "warning", "Hostname": "gpu-node-1", "gpu": "0"}}]}]},
]


@needs_promtool
def test_promtool_parses_gpu_dashboard_queries(tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(_gpu_exprs()):
        for var, value in GPU_GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"gpu_dashboard:query_{i}", "expr": expr})
    path = tmp_path / "gpu_dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "gpu-dashboard", "rules": rules}]}))
    res = _promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_alert_unit_tests(tmp_path: Path) -> None:
    # Annotations are templates for humans; the unit tests pin expr, `for` and labels.
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for r in group["rules"]:
            r.pop("annotations", None)
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(rules))
    tests = {"rule_files": ["alerts.yaml"], "evaluation_interval": "1m", "tests": copy.deepcopy(ALERT_CASES)}
    (tmp_path / "alerts_test.yaml").write_text(yaml.safe_dump(tests))
    res = subprocess.run([promtool or "promtool", "test", "rules", "alerts_test.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
