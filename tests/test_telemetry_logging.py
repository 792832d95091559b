"""Structured JSON logs: request id and tenant on every request line, never a key or password."""

from __future__ import annotations

import io
import json
import logging
import secrets
import time
import uuid
from pathlib import Path

import httpx
import pytest

from telemetry.context import RequestInfo, annotate, bind_request, unbind_request
from telemetry.logging import JsonFormatter, RedactingFilter, redact

KEY = "gsk_" + "A1b2C3d4" * 5 + "xyz"


@pytest.mark.parametrize(("text", "secret"), [
    (f"key {KEY} rejected", KEY[4:]),
    (f"Authorization: Bearer {KEY}", KEY[4:]),
    ("{'authorization': 'Bearer s3cr3t-admin-token'}", "s3cr3t-admin-token"),
    ("headers={'x-api-key': 'plain-secret-value'}", "plain-secret-value"),
    ("X-API-Key: plain-secret-value", "plain-secret-value"),
    ("postgresql+psycopg://genserve:hunter2@db:5432/genserve", "hunter2"),
    ("redis://:hunter2@redis:6379/0", "hunter2"),
    ("connect?password=hunter2&user=x", "hunter2"),
])
def test_redact(text: str, secret: str) -> None:
    clean = redact(text)
    assert secret not in clean and "[REDACTED]" in clean


def test_redact_keeps_ordinary_text() -> None:
    text = "POST /v1/chat/completions 200 12.5ms prompt_tokens=5 completion_tokens=7 postgresql://db/genserve"
    assert redact(text) == text


def test_json_lines_carry_request_and_tenant_and_no_secrets() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("Ingress", "r1"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("genserve.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    token = bind_request(RequestInfo("req-1"))
    try:
        annotate(tenant="acme", model="sdxl-tiny")
        logger.warning("auth header %s", {"Authorization": f"Bearer {KEY}"}, extra={"fields": {"route": "/x"}})
        try:
            raise ValueError(f"bad key {KEY}")
        except ValueError:
            logger.exception("failed")
    finally:
        unbind_request(token)
        logger.removeHandler(handler)
    logger.info("outside any request")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["request_id"] == "req-1" and line["tenant"] == "acme" and line["model"] == "sdxl-tiny"
        assert line["component"] == "Ingress" and line["replica"] == "r1" and line["ts"].endswith("+00:00")
    assert lines[0]["route"] == "/x" and lines[0]["level"] == "WARNING"
    assert "ValueError" in lines[1]["exc"]
    assert KEY[4:] not in out.getvalue() and "A1b2C3d4" not in out.getvalue()


# -- on the shared cluster --------------------------------------------------------------------

@pytest.mark.ray
def test_replica_logs_are_json_with_request_id_and_tenant_and_no_keys(genserve_url: str, api_key: str) -> None:
    import ray

    rid = f"logtest-{uuid.uuid4().hex}"
    r = httpx.get(genserve_url + "/v1/models", headers={"X-API-Key": api_key, "X-Request-ID": rid}, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    chat = httpx.post(genserve_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                      timeout=60)
    assert chat.status_code == 200, chat.text
    wrong = "gsk_" + secrets.token_urlsafe(32)
    assert httpx.get(genserve_url + "/v1/models", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline, line = time.monotonic() + 30, None
    while line is None and time.monotonic() < deadline:
        for f in logs.glob("serve/genserve_Ingress_*.log"):
            for raw in f.read_text().splitlines():
                entry = json.loads(raw)  # every line is one JSON object
                if entry.get("request_id") == rid:
                    line = entry
        time.sleep(0.5)
    assert line is not None, f"no log line with request_id {rid} under {logs / 'serve'}"
    assert line["tenant"] == "local" and line["route"] == "/v1/models" and line["status"] == 200
    assert line["logger"] == "genserve.access" and line["component"] == "Ingress"
    replica_logs = list(logs.glob("serve/genserve_*.log"))
    assert {p.name.split("_")[1] for p in replica_logs} >= {"Ingress", "Diffusion-sdxl-tiny", "LLM-tiny-chat"}
    # No key anywhere in the session's logs: ours, Serve's, workers' stdout/stderr, Ray's own.
    for f in logs.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert api_key.encode() not in data and api_key[12:].encode() not in data, f
            assert wrong.encode() not in data, f
