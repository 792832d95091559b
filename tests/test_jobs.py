"""Async jobs through the real graph: submit, progress, results at signed URLs, cancel, webhooks."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from conftest import WEBHOOK_SECRET, free_port
from PIL import Image

from serve_app.webhooks import verify_signature

pytestmark = pytest.mark.ray

TERMINAL = {"succeeded", "failed", "cancelled"}


def wait_job(url: str, auth: dict, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth, timeout=30).json()
        if job["status"] in TERMINAL or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def test_job_lifecycle_and_signed_result_urls(genserve_url: str, auth: dict) -> None:
    r = httpx.post(genserve_url + "/v1/jobs", headers=auth, timeout=30,
                   json={"prompt": "a quiet harbour --ar 3:2 --seed 21", "n": 3, "steps": 4, "metadata": True})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and job["id"].startswith("job_")
    assert job["queue_position"] >= 0 and job["estimated_seconds"] > 0
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    done = wait_job(genserve_url, auth, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["started_at"] and done["finished_at"] and done["generation_id"]
    assert [res["seed"] for res in done["results"]] == [21, 22, 23]
    png = httpx.get(done["results"][0]["url"])  # signed: no API key needed
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(png.content))
    assert img.size == (80, 56) and img.text["seed"] == "21" and img.text["prompt"] == "a quiet harbour"
    tampered = done["results"][0]["url"].replace("sig=", "sig=0")
    assert httpx.get(tampered).status_code == 403
    # The generation log has it, and it can be rated.
    rated = httpx.post(f"{genserve_url}/v1/generations/{done['generation_id']}/rating", headers=auth,
                       json={"rating": 5})
    assert rated.status_code == 200 and rated.json()["rating"] == 5
    listed = httpx.get(genserve_url + "/v1/jobs?limit=1", headers=auth).json()
    assert listed["data"][0]["id"] == job["id"] and listed["has_more"] in (True, False)


def test_other_tenants_cannot_see_a_job(genserve_url: str, auth: dict) -> None:
    from conftest import ADMIN_TOKEN

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    httpx.post(genserve_url + "/admin/tenants", headers=admin, json={"name": "other-co", "plan": "free"})
    key = httpx.post(genserve_url + "/admin/tenants/other-co/keys", headers=admin, json={}).json()["key"]
    job = httpx.post(genserve_url + "/v1/jobs", headers=auth, json={"prompt": "mine"}).json()
    other = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{genserve_url}/v1/jobs/{job['id']}", headers=other).status_code == 404
    assert httpx.delete(f"{genserve_url}/v1/jobs/{job['id']}", headers=other).status_code == 404
    assert wait_job(genserve_url, auth, job["id"])["status"] == "succeeded"


def test_progress_events_stream_from_the_diffusion_replica(genserve_url: str) -> None:
    from ray import serve

    from deployments.diffusion.types import ImageResult, ImageTask

    handle = serve.get_deployment_handle("Diffusion-sdxl-tiny", app_name="genserve")
    task = ImageTask(prompt="steps", negative_prompt="", seed=1, width=32, height=32, steps=6, guidance_scale=5.0,
                     task_id="progress-test")
    events = list(handle.options(stream=True).generate_stream.remote(task))
    steps = [e["step"] for e in events if isinstance(e, dict)]
    assert steps == [1, 2, 3, 4, 5, 6] and {e["total"] for e in events if isinstance(e, dict)} == {6}
    assert isinstance(events[-1], ImageResult)


def test_cancel_stops_a_running_generation_at_its_next_step(genserve_url: str) -> None:
    from ray import serve

    from deployments.diffusion.types import ImageTask

    handle = serve.get_deployment_handle("Diffusion-sdxl-tiny", app_name="genserve")
    before = handle.stats.remote().result()["images_cancelled"]
    task = ImageTask(prompt="long", negative_prompt="", seed=2, width=64, height=64, steps=400, guidance_scale=5.0,
                     task_id="cancel-test")
    stream = handle.options(stream=True).generate_stream.remote(task)
    first = next(iter(stream))
    assert first["step"] >= 1
    stream.cancel()
    deadline = time.monotonic() + 30
    while handle.stats.remote().result()["images_cancelled"] == before:
        assert time.monotonic() < deadline, "the cancelled generation kept running"
        time.sleep(0.2)
    assert handle.last_step.remote("cancel-test").result() < 400


def test_cancel_job_via_api(genserve_url: str, auth: dict) -> None:
    job = httpx.post(genserve_url + "/v1/jobs", headers=auth, json={"prompt": "to cancel", "n": 10, "steps": 8}).json()
    r = httpx.delete(f"{genserve_url}/v1/jobs/{job['id']}", headers=auth)
    assert r.status_code == 200
    done = wait_job(genserve_url, auth, job["id"])
    assert done["status"] in ("cancelled", "succeeded"), done  # it may have finished before the cancel landed
    if done["status"] == "cancelled":
        assert done["results"] == [] and "cancel" in done["error"]


class _Receiver(BaseHTTPRequestHandler):
    calls: list = []
    fail_first = 1

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).calls.append((dict(self.headers), body))
        status = 500 if len(type(self).calls) <= type(self).fail_first else 200
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_webhook_is_signed_retried_and_recorded(genserve_url: str, auth: dict) -> None:
    port = free_port()
    server = HTTPServer(("127.0.0.1", port), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = httpx.post(genserve_url + "/v1/jobs", headers=auth,
                       json={"prompt": "notify me", "webhook_url": f"http://127.0.0.1:{port}/hook"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert wait_job(genserve_url, auth, job["id"])["status"] == "succeeded"
        deadline = time.monotonic() + 30
        while len(_Receiver.calls) < 2:
            assert time.monotonic() < deadline, _Receiver.calls
            time.sleep(0.1)
        headers, body = _Receiver.calls[-1]
        payload = json.loads(body)
        assert payload["id"] == job["id"] and payload["status"] == "succeeded"
        signature = {k.lower(): v for k, v in headers.items()}["x-genserve-signature"]
        assert verify_signature(body, signature, WEBHOOK_SECRET.encode())
    finally:
        server.shutdown()
    # Refused: non-http(s) schemes, and private addresses that are not on the allow-list.
    for bad in ("ftp://127.0.0.1/x", "http://10.1.2.3/hook", "file:///etc/passwd"):
        r = httpx.post(genserve_url + "/v1/jobs", headers=auth, json={"prompt": "x", "webhook_url": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", r.text
