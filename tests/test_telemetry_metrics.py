"""genserve's metrics on the shared cluster's real Prometheus endpoint, parsed by prometheus_client.

Drives an image request (stored as URLs), an async job, a streamed chat and a 429 through the app
from configs/local.yaml, then polls the endpoint (Ray's metrics agent exports every few seconds)
until every recorded metric shows sane values."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import httpx
import pytest
from conftest import ADMIN_TOKEN
from prometheus_client.parser import text_string_to_metric_families

from telemetry.catalog import GENSERVE_METRICS

pytestmark = pytest.mark.ray

Sample = tuple[dict[str, str], float]


def scrape(url: str) -> dict[str, list[Sample]]:
    """Series name -> [(labels, value)], genserve's series only."""
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            if s.name.startswith("ray_genserve_"):
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(series: dict[str, list[Sample]], name: str, **labels: str) -> float:
    return sum(v for lab, v in series.get(name, []) if all(lab.get(k) == want for k, want in labels.items()))


def poll(url: str, checks: dict[str, Callable[[dict[str, list[Sample]]], bool]], timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while True:
        series = scrape(url)
        failing = [name for name, ok in checks.items() if not ok(series)]
        if not failing:
            return series
        if time.monotonic() > deadline:
            pytest.fail(f"metrics still missing after {timeout_s}s: {failing}; have {sorted(series)}")
        time.sleep(2)


def test_genserve_metrics_reach_prometheus(genserve_url: str, auth: dict, metrics_url: str) -> None:
    r = httpx.post(genserve_url + "/v1/images/generations", headers=auth, timeout=120,
                   json={"prompt": "metrics harbour --seed 3", "n": 2, "response_format": "url"})
    assert r.status_code == 200, r.text
    job = httpx.post(genserve_url + "/v1/jobs", headers=auth, timeout=30, json={"prompt": "metrics job", "n": 1})
    assert job.status_code == 202, job.text
    deadline = time.monotonic() + 120
    while httpx.get(f"{genserve_url}/v1/jobs/{job.json()['id']}", headers=auth).json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(0.3)
    with httpx.stream("POST", genserve_url + "/v1/chat/completions", headers=auth, timeout=120,
                      json={"model": "tiny-chat", "messages": [{"role": "user", "content": "count to ten"}],
                            "max_tokens": 48, "temperature": 0, "stream": True}) as s:
        assert s.status_code == 200
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    # A tenant on the free plan (5 images per window) asking for 6 images gets a 429.
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    name = f"metrics-{uuid.uuid4().hex[:6]}"
    assert httpx.post(genserve_url + "/admin/tenants", headers=admin, json={"name": name, "plan": "free"}).is_success
    key = httpx.post(f"{genserve_url}/admin/tenants/{name}/keys", headers=admin, json={}).json()["key"]
    limited = httpx.post(genserve_url + "/v1/images/generations", headers={"Authorization": f"Bearer {key}"},
                         json={"prompt": "too many", "n": 6}, timeout=30)
    assert limited.status_code == 429, limited.text

    images = "/v1/images/generations"
    series = poll(metrics_url, {
        "request latency": lambda s: total(s, "ray_genserve_request_latency_seconds_count", route=images,
                                           model="sdxl-tiny", status="200") >= 1,
        "429 latency": lambda s: total(s, "ray_genserve_request_latency_seconds_count", route=images,
                                       status="429") >= 1,
        "images": lambda s: total(s, "ray_genserve_images_generated_total", model="sdxl-tiny", tenant="local") >= 3,
        "batch size": lambda s: total(s, "ray_genserve_batch_size_count", model="sdxl-tiny") >= 1,
        "queue wait": lambda s: total(s, "ray_genserve_queue_wait_seconds_count", model="sdxl-tiny") >= 3,
        "step time": lambda s: total(s, "ray_genserve_diffusion_step_seconds_count", model="sdxl-tiny") >= 1,
        "tokens in": lambda s: total(s, "ray_genserve_tokens_total", model="tiny-chat", direction="in") > 0,
        "tokens out": lambda s: total(s, "ray_genserve_tokens_total", model="tiny-chat", direction="out") > 0,
        "ttft": lambda s: total(s, "ray_genserve_ttft_seconds_count", model="tiny-chat") >= 1,
        "inter-token": lambda s: total(s, "ray_genserve_inter_token_latency_seconds_count", model="tiny-chat") >= 1,
        "tenant requests": lambda s: total(s, "ray_genserve_tenant_requests_total", tenant="local",
                                           route="images") >= 1,
        # The free tenant is labelled by its plan, `local` (top plan: telemetry.tenant_label) by name.
        "rate limited": lambda s: total(s, "ray_genserve_rate_limited_total", tenant="plan:free", kind="images") >= 1,
        "latency by tenant": lambda s: total(s, "ray_genserve_request_latency_seconds_count", route=images,
                                             model="sdxl-tiny", tenant="local", status="200") >= 1,
        "gpu seconds": lambda s: all(total(s, "ray_genserve_gpu_seconds_total", model=m, tenant="local") > 0
                                     for m in ("sdxl-tiny", "tiny-chat")),
        # configs/local.yaml prices every model at $1 per GPU-hour
        "gpu cost": lambda s: total(s, "ray_genserve_gpu_cost_usd_total", model="tiny-chat", tenant="local") > 0,
        "billed": lambda s: total(s, "ray_genserve_billed_usd_total", model="sdxl-tiny", tenant="local") > 0,
        "in flight": lambda s: any(lab.get("model") == "tiny-chat" and lab.get("tenant") == "local"
                                   for lab, _ in s.get("ray_genserve_requests_in_flight", [])),
        # the chat stream above started on the LLM replica while its admission ran
        "admission overlap": lambda s: total(s, "ray_genserve_admission_overlap_total", outcome="admitted") >= 1,
        "job transitions": lambda s: all(total(s, "ray_genserve_job_transitions_total", state=st) >= 1
                                         for st in ("queued", "running", "succeeded")),
        "jobs in state": lambda s: total(s, "ray_genserve_jobs_in_state", state="succeeded") >= 1,
    })

    # Serve adds its tags; route labels are templates, never raw paths with ids.
    # (Other tests run their own small apps on the shared cluster: look at this app's series.)
    lat = [(lab, v) for lab, v in series["ray_genserve_request_latency_seconds_count"]
           if lab["application"] == "genserve"]
    assert lat and all(lab["deployment"] == "Ingress" for lab, _ in lat)
    assert {lab["route"] for lab, _ in lat} >= {images, "/v1/jobs", "/v1/jobs/{job_id}", "/v1/chat/completions"}
    assert name not in {lab.get("tenant") for _, series_ in series.items() for lab, _ in series_}  # bounded
    batch = [lab for lab, _ in series["ray_genserve_batch_size_count"]]
    assert {lab["deployment"] for lab in batch} >= {"Diffusion-sdxl-tiny"}
    # Histograms: cumulative buckets from the catalogue's boundaries up to +Inf, which equals _count.
    def ours(name: str) -> list[Sample]:
        return [(lab, v) for lab, v in series[name] if lab.get("model") in ("sdxl-tiny", "tiny-chat")]

    for name in ("ray_genserve_request_latency_seconds", "ray_genserve_batch_size", "ray_genserve_ttft_seconds"):
        buckets = ours(f"{name}_bucket")
        assert buckets, name
        spec = GENSERVE_METRICS[name.removeprefix("ray_")]
        les = {lab["le"] for lab, _ in buckets}
        assert "+Inf" in les and {float(le) for le in les - {"+Inf"}} == set(map(float, spec.boundaries)), name
        inf = sum(v for lab, v in buckets if lab["le"] == "+Inf")
        assert inf == sum(v for _, v in ours(f"{name}_count")) > 0, name
    assert 0 < total(series, "ray_genserve_ttft_seconds_sum") < 120
    # Every series the dashboards may query has its catalogue name (degraded_requests: issue 9).
    exported = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count").removeprefix("ray_")
                for n in series}
    # Degraded requests appear only once a test has overloaded a replica (adaptive quality).
    assert set(GENSERVE_METRICS) - exported <= {"genserve_degraded_requests_total"}
