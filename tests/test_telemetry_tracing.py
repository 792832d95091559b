"""One trace per request across ingress → LLM → diffusion → storage, and the OTLP exporter.

The chain crosses processes, so its spans are collected the way production collects them: every
process exports OTLP/HTTP to a collector (here a small HTTP server in the test process that
decodes the protobuf). The diffusion and LLM deployments run as real replicas on the shared
cluster, bound with `telemetry={"otlp_endpoint": ...}`; the ingress's own FastAPI app
(`create_app(build_services(...))`, what `Ingress` serves) runs in the test process and calls
them through DeploymentHandles. So a replica span whose parent is an ingress span proves the
context travelled inside the request object (`trace_context`) across processes.

(Serve's local testing mode would keep every span in one process, but in Ray 2.60 `@serve.batch`
fails there: its queue calls `serve.get_replica_context()`, which local replicas don't set.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from conftest import free_port, local_config_doc
from opentelemetry.trace import SpanKind

from telemetry import tracing
from telemetry.config import TelemetryConfig


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str  # "" for a root span
    kind: int  # OTLP enum: 2 SERVER, 3 CLIENT
    start: int
    end: int
    attrs: dict
    resource: dict


def _value(v):  # OTLP AnyValue -> Python
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


class Collector:
    """An OTLP/HTTP trace receiver: POST /v1/traces with ExportTraceServiceRequest protobufs."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.receive(self.path, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def receive(self, path: str, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        req = ExportTraceServiceRequest.FromString(body)
        with self._lock:
            self.paths.append(path)
            for rs in req.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(Span(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                               s.kind, s.start_time_unix_nano, s.end_time_unix_nano,
                                               {a.key: _value(a.value) for a in s.attributes}, resource))

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def by_name(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def parent_of(span: Span, spans: list[Span]) -> Span | None:
    return next((s for s in spans if s.span_id == span.parent), None)


async def wait_for(collector: Collector, trace_id: str, names: dict[str, int], timeout_s: float = 60) -> list[Span]:
    """The trace's spans once it holds `names` (name -> count); replicas batch-export every ~5 s.

    Async on purpose: this process's own spans (the ingress's, the job runner's) end on the event
    loop, so waiting must leave the loop running (a `time.sleep` here froze them for the whole wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        await asyncio.to_thread(tracing.force_flush)  # this process's ended spans, without the 5 s batch delay
        spans = collector.trace(trace_id)
        if all(len(by_name(spans, n)) >= k for n, k in names.items()):
            return spans
        if time.monotonic() > deadline:
            got = sorted(s.name for s in spans)
            raise AssertionError(f"trace {trace_id} after {timeout_s}s: expected at least {names}, got {got}")
        await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
def traced_graph(genserve_url: str, collector: Collector, tmp_path_factory):
    """(config, diffusion handles, llm handles): model replicas on the cluster exporting to `collector`."""
    from ray import serve

    from deployments.diffusion.deployment import DiffusionDeployment
    from deployments.llm.deployment import LLMDeployment
    from serve_app.config import load_app_config

    doc = local_config_doc(free_port(), tmp_path_factory.mktemp("trace-work"))
    cfg = load_app_config(doc["applications"][0]["args"])
    cfg = cfg.model_copy(update={"diffusion_models": cfg.diffusion_models[:1]})  # sdxl-tiny is enough
    telemetry = TelemetryConfig(otlp_endpoint=collector.url, service_name="genserve-test")
    m, lm = cfg.diffusion_models[0], cfg.llm_models[0]
    cpu = {"num_cpus": 0.25}
    diffusion = serve.run(DiffusionDeployment.options(name=m.deployment_name, ray_actor_options=cpu).bind(
        m.model_copy(update={"device": "cpu"}), telemetry), name="trace-diffusion", route_prefix=None)
    llm = serve.run(LLMDeployment.options(name=lm.deployment_name, ray_actor_options=cpu).bind(
        lm, work_dir=cfg.work_dir, telemetry=telemetry),
        name="trace-llm", route_prefix=None)
    tracing.reset_tracing()
    assert tracing.configure_tracing(TelemetryConfig(otlp_endpoint=collector.url), component="Ingress")
    yield cfg, {m.name: diffusion}, {lm.name: llm}
    tracing.reset_tracing()
    for app in ("trace-diffusion", "trace-llm"):
        serve.delete(app, _blocking=False)


@pytest.mark.ray
async def test_chained_request_is_one_trace(traced_graph, collector: Collector) -> None:
    from serve_app.app import create_app
    from serve_app.ingress import build_services

    cfg, diffusion, llm = traced_graph
    services = build_services(cfg, diffusion, llm)
    runner = services.jobs.runner
    runner.start()
    key = cfg.tenancy.resolved_key_file(cfg.work_dir).read_text().strip()
    auth = {"Authorization": f"Bearer {key}"}
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://genserve") as client:
        r = await client.post("/v1/images/generations", headers=auth, timeout=120, json={
            "prompt": "a red fox", "enhance": True, "n": 2, "seed": 4, "response_format": "url"})
        assert r.status_code == 200, r.text
        rid = r.headers["x-request-id"]
        job = await client.post("/v1/jobs", headers=auth, json={"prompt": "a quiet harbour", "n": 1, "seed": 1})
        assert job.status_code == 202, job.text
        for _ in range(600):
            status = (await client.get(f"/v1/jobs/{job.json()['id']}", headers=auth)).json()["status"]
            if status in ("succeeded", "failed", "cancelled"):
                break
            await asyncio.sleep(0.1)
        assert status == "succeeded"
        # "succeeded" is written inside the run: the job.run span ends only after the run's last
        # steps (terminal hook, usage). Let it finish; stop() would cancel it mid-way.
        deadline = time.monotonic() + 30
        while runner.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not runner.running, f"job run still going 30 s after it succeeded: {runner.running}"
    await runner.stop()
    tracing.force_flush()

    [http] = [s for s in collector.spans if s.name == "POST /v1/images/generations" and
              s.attrs.get("genserve.request_id") == rid]
    assert http.parent == "" and http.kind == 2 and http.resource["genserve.component"] == "Ingress"
    assert http.attrs["genserve.tenant"] == "local" and http.attrs["genserve.model"] == "sdxl-tiny"
    assert http.attrs["http.response.status_code"] == 200 and http.attrs["http.route"] == "/v1/images/generations"
    trace = await wait_for(collector, http.trace_id, {"llm.generate": 1, "diffusion.generate": 2, "storage.put": 2})

    [llm_call] = by_name(trace, "llm.call")
    [llm_span] = by_name(trace, "llm.generate")
    assert parent_of(llm_call, trace) is http and parent_of(llm_span, trace) is llm_call
    assert llm_span.resource["genserve.component"] == "LLM-tiny-chat" and llm_span.kind == 2
    assert llm_span.attrs["genserve.model"] == "tiny-chat" and llm_span.attrs["genserve.tenant"] == "local"
    assert llm_span.attrs["genserve.prompt_tokens"] > 0

    [diff_call] = by_name(trace, "diffusion.call")
    images = by_name(trace, "diffusion.generate")
    assert parent_of(diff_call, trace) is http and len(images) == 2
    for s in images:
        assert parent_of(s, trace) is diff_call and s.resource["genserve.component"] == "Diffusion-sdxl-tiny"
        a = s.attrs
        assert a["genserve.model"] == "sdxl-tiny" and a["genserve.tenant"] == "local" and a["genserve.steps"] == 2
        assert a["genserve.batch_size"] >= 1 and a["genserve.queue_wait_s"] >= 0
    assert llm_span.end <= diff_call.start  # the chain: expand first, then draw

    stores = by_name(trace, "storage.put")
    assert len(stores) == 2 and all(parent_of(s, trace) is http for s in stores)
    assert all(s.attrs["genserve.backend"] == "local" for s in stores)
    assert min(s.start for s in stores) >= max(s.end for s in images)

    # The job: the HTTP span of the submission → job.run → diffusion.call → diffusion (a stream),
    # and storage (the same `ImagesService.run` as the synchronous route, so the same spans).
    [submit] = [s for s in collector.spans if s.name == "POST /v1/jobs"]
    trace = await wait_for(collector, submit.trace_id, {"job.run": 1, "diffusion.generate": 1, "storage.put": 1})
    [run] = by_name(trace, "job.run")
    [job_call] = by_name(trace, "diffusion.call")
    [image] = by_name(trace, "diffusion.generate")
    [store] = by_name(trace, "storage.put")
    assert parent_of(run, trace) is submit and run.attrs["genserve.job_id"] == job.json()["id"]
    assert parent_of(job_call, trace) is run and parent_of(image, trace) is job_call
    assert parent_of(store, trace) is run
    assert image.attrs["genserve.task_id"].startswith(job.json()["id"])
    assert set(collector.paths) == {"/v1/traces"}


def test_without_endpoint_tracing_is_a_no_op() -> None:
    tracing.reset_tracing()
    assert tracing.configure_tracing(TelemetryConfig(), component="x") is False
    with tracing.span("nothing", model="m") as s:
        assert not s.is_recording()
        assert tracing.outgoing() is None  # no traceparent, no request bound: nothing to carry
    assert TelemetryConfig(otlp_endpoint="").otlp_endpoint is None
    with pytest.raises(ValueError, match="otlp_endpoint must be an http"):
        TelemetryConfig(otlp_endpoint="collector:4318")


def test_otlp_http_exporter_posts_spans_to_the_endpoint(collector: Collector) -> None:
    tracing.reset_tracing()
    try:
        cfg = TelemetryConfig(otlp_endpoint=collector.url, service_name="genserve-unit")
        assert tracing.configure_tracing(cfg, component="unit")
        assert not tracing.configure_tracing(cfg, component="again")  # the first configuration wins
        with tracing.span("outer", tenant="acme") as outer:
            with tracing.span("inner", kind=SpanKind.CLIENT):
                carrier = tracing.outgoing()
        tracing.force_flush()
    finally:
        tracing.reset_tracing()
    assert carrier is not None and carrier["traceparent"].startswith("00-")
    trace_id = f"{outer.get_span_context().trace_id:032x}"
    spans = {s.name: s for s in collector.trace(trace_id)}
    assert set(spans) == {"outer", "inner"} and spans["inner"].parent == spans["outer"].span_id
    assert spans["outer"].resource["service.name"] == "genserve-unit"
    assert spans["outer"].attrs["genserve.tenant"] == "acme" and spans["inner"].kind == 3
    # The carrier names the inner span: a replica continuing it becomes its child.
    assert carrier["traceparent"].split("-")[2] == spans["inner"].span_id
