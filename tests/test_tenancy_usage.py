"""Usage accounting: streamed and non-streamed requests record the same totals as the responses'
own `usage`; a client that disconnects mid-stream is billed for what it was sent, once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from servers import db_url, free_port, make_tenancy, postgres_server, tenancy_app  # noqa: F401  (fixtures)
from sqlalchemy import select

from serve_app.tenancy.models import InFlight, UsageEvent

PRICES = {"per_1k_prompt_tokens": 1.0, "per_1k_completion_tokens": 2.0, "per_image": 0.0, "per_gpu_second": 0.0}


def _events(tenancy) -> list:  # type: ignore[no-untyped-def]
    with tenancy.engine.connect() as conn:
        return conn.execute(select(UsageEvent).order_by(UsageEvent.id)).all()


def test_streamed_and_non_streamed_usage_match_responses(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    tenancy = make_tenancy(db_url, tmp_path, prices=PRICES)
    tenancy.create_tenant("acme", "pro")
    key = tenancy.create_key("acme").key
    body = {"model": "m", "messages": [{"role": "user", "content": "one two three four five"}], "max_tokens": 7}
    with TestClient(tenancy_app(tenancy)) as client:
        plain = client.post("/v1/chat/completions", headers={"X-API-Key": key}, json=body)
        assert plain.status_code == 200
        streamed_usage, deltas = None, 0
        with client.stream("POST", "/v1/chat/completions", headers={"X-API-Key": key},
                           json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "300"
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    deltas += len(chunk["choices"])
                    streamed_usage = chunk.get("usage") or streamed_usage
        with client.stream("POST", "/v1/chat/completions", headers={"X-API-Key": key},
                           json={**body, "stream": True}) as r:  # no usage chunk: counted from the deltas
            assert sum(1 for line in r.iter_lines() if line.startswith("data: {")) == 7
        summary = client.get("/v1/usage", headers={"X-API-Key": key}).json()
    expected = plain.json()["usage"]
    assert streamed_usage == expected and deltas == expected["completion_tokens"] == 7
    rows = _events(tenancy)
    assert len(rows) == 3
    for row in rows:
        assert (row.prompt_tokens, row.completion_tokens, row.status) == (5, 7, "ok")
        assert row.cost_micros == 5 * 1000 + 7 * 2000  # $1/1k prompt, $2/1k completion
    assert summary["today"] == summary["month"]
    assert summary["today"]["requests"] == 3 and summary["today"]["total_tokens"] == 36
    assert summary["today"]["cost_usd"] == pytest.approx(3 * 0.019)
    assert summary["budget"]["spent_usd"] == pytest.approx(3 * 0.019) and summary["budget"]["reserved_usd"] == 0
    tenancy.close()


def test_disconnect_mid_stream_bills_what_was_sent(tmp_path: Path) -> None:
    tenancy = make_tenancy(f"sqlite:///{tmp_path / 'a.db'}", tmp_path, prices=PRICES)
    tenancy.create_tenant("acme", "pro")
    key = tenancy.create_key("acme").key
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(tenancy_app(tenancy), host="127.0.0.1", port=port, log_level="error",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 200,
                "delay": 0.02, "stream": True}
        received = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            with client.stream("POST", "/v1/chat/completions", headers={"X-API-Key": key}, json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        received += 1
                    if received == 5:
                        break  # leaving the block closes the connection mid-stream
        deadline = time.monotonic() + 15
        while not _events(tenancy) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # would a second (double) settle show up?
        rows = _events(tenancy)
        assert len(rows) == 1
        row = rows[0]
        assert row.status == "disconnected" and row.prompt_tokens == 2
        # Sent = received plus at most what sat in socket buffers when the client left.
        assert 5 <= row.completion_tokens < 200
        assert tenancy.usage("acme").totals.requests == 1
        with tenancy.engine.connect() as conn:  # the concurrency slot came back too
            assert conn.execute(select(InFlight.count)).scalar() == 0
        print("completion tokens billed after disconnect:", row.completion_tokens)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        tenancy.close()
