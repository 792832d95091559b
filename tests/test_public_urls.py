"""Result and webhook URLs come from configuration (public_base_url), never from the Host header;
`trusted_hosts` refuses foreign Host names; PNG text chunks only when asked (issue 17, findings 6, 8)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from conftest import free_port
from fastapi import FastAPI
from PIL import Image

from serve_app import launcher
from serve_app.config import AppConfig
from serve_app.images.qos import embeds_metadata
from serve_app.tenancy.config import PlanConfig
from serve_app.trusted_hosts import TrustedHosts

EVIL = "evil.example:1234"
MODEL = {"name": "m", "family": "sdxl", "model": "none"}


def _wait_job(url: str, auth: dict, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


class _Hook(BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802
        type(self).bodies.append(self.rfile.read(int(self.headers["content-length"])))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_host_header_never_reaches_result_or_webhook_urls(genserve_url: str, auth: dict) -> None:
    evil = {**auth, "Host": EVIL}
    r = httpx.post(genserve_url + "/v1/images/generations", headers=evil, timeout=120,
                   json={"prompt": "a harbour", "response_format": "url"})
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    assert url.startswith(genserve_url + "/files/") and "evil" not in url
    assert httpx.get(url).status_code == 200  # and it works

    port = free_port()
    server = HTTPServer(("127.0.0.1", port), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = httpx.post(genserve_url + "/v1/jobs", headers=evil, timeout=30,
                       json={"prompt": "a pier", "webhook_url": f"http://127.0.0.1:{port}/hook"})
        assert r.status_code == 202, r.text
        done = _wait_job(genserve_url, evil, r.json()["id"])
        assert done["status"] == "succeeded" and done["results"][0]["url"].startswith(genserve_url + "/files/")
        listed = httpx.get(genserve_url + "/v1/jobs", headers=evil).text
        deadline = time.monotonic() + 30
        while not _Hook.bodies:
            assert time.monotonic() < deadline, "no webhook"
            time.sleep(0.1)
        payload = json.loads(_Hook.bodies[-1])
        assert payload["results"][0]["url"].startswith(genserve_url + "/files/")
        assert "evil" not in _Hook.bodies[-1].decode() and "evil" not in json.dumps(done) and "evil" not in listed
    finally:
        server.shutdown()


def test_png_metadata_is_off_by_default_and_a_request_option(genserve_url: str, auth: dict) -> None:
    def text_chunks(body: dict) -> dict:
        r = httpx.post(genserve_url + "/v1/images/generations", headers=auth, timeout=120, json=body)
        assert r.status_code == 200, r.text
        return Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).text

    assert text_chunks({"prompt": "a secret plan --seed 3"}) == {}
    assert text_chunks({"prompt": "a secret plan --seed 3", "metadata": False}) == {}
    shared = text_chunks({"prompt": "a secret plan --seed 3", "metadata": True})
    assert shared["prompt"] == "a secret plan" and shared["seed"] == "3"
    schema = httpx.get(genserve_url + "/openapi.json").json()["components"]["schemas"]
    assert "metadata" in schema["ImageGenerationRequest"]["properties"]
    assert "metadata" in schema["JobCreateRequest"]["properties"]
    r = httpx.post(genserve_url + "/v1/images/generations", headers=auth, json={"prompt": "x", "metadata": "maybe"})
    assert r.status_code in (400, 422) and r.json()["error"]["param"] == "metadata", r.text


def test_plan_default_for_png_metadata() -> None:
    on, off = PlanConfig(name="open", png_metadata=True), PlanConfig(name="private")
    assert off.png_metadata is False  # privacy by default
    cases = [(off, None), (on, None), (on, False), (off, True)]
    assert [embeds_metadata(plan, m) for plan, m in cases] == [False, True, False, True]


def test_public_base_url_config() -> None:
    assert AppConfig(diffusion_models=[MODEL]).public_base_url == "http://127.0.0.1:8000"
    assert AppConfig(diffusion_models=[MODEL], public_base_url="https://api.example.com/").public_base_url == \
        "https://api.example.com"
    for bad in ("", "api.example.com", "ftp://x.example", "https://x.example/?a=1"):
        with pytest.raises(ValueError, match="public_base_url"):
            AppConfig(diffusion_models=[MODEL], public_base_url=bad)


def test_launcher_fills_public_base_url_from_the_bind_address() -> None:
    doc = {"http_options": {"host": "0.0.0.0", "port": 9123}, "applications": [
        {"name": "a", "route_prefix": "/", "import_path": "serve_app.graph:build_app", "args": {}},
        {"name": "b", "route_prefix": "/b", "import_path": "serve_app.graph:build_app",
         "args": {"public_base_url": "https://kept.example"}},
        {"name": "c", "route_prefix": "/c", "import_path": "serve_app.graph:build_app", "args": {}}]}
    launcher._default_public_base_url(doc)
    assert [a["args"]["public_base_url"] for a in doc["applications"]] == [
        "http://127.0.0.1:9123", "https://kept.example", "http://127.0.0.1:9123/c"]


async def test_trusted_hosts_refuse_other_host_headers() -> None:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True}

    guarded = TrustedHosts(app, ["api.example.com", "*.internal.example"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://api.example.com") as c:
        assert (await c.get("/ping")).json() == {"ok": True}
        assert (await c.get("/ping", headers={"Host": "api.example.com:8443"})).status_code == 200
        assert (await c.get("/ping", headers={"Host": "node1.internal.example"})).status_code == 200
        r = await c.get("/ping", headers={"Host": EVIL})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"


def test_production_config_requires_public_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    import yaml

    from serve_app.config import load_app_config

    args = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "serve.yaml").read_text())[
        "applications"][0]["args"]
    monkeypatch.delenv("GENSERVE_PUBLIC_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="GENSERVE_PUBLIC_BASE_URL"):
        load_app_config(args)
    monkeypatch.setenv("GENSERVE_PUBLIC_BASE_URL", "https://api.example.com/")
    assert load_app_config(args).public_base_url == "https://api.example.com"
