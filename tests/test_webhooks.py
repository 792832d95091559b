"""Webhooks: URL policy (SSRF), signatures, and delivery with retries to a real receiver on
127.0.0.1, every attempt recorded in the app database (SQLite and Postgres)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from servers import db_url, free_port, postgres_server  # noqa: F401  (fixtures)

from serve_app.errors import APIError
from serve_app.tenancy.db import make_engine, upgrade
from serve_app.webhooks import (
    SIGNATURE_HEADER,
    DeliveryAttempt,
    DeliveryLog,
    WebhookConfig,
    WebhookSender,
    deliver,
    sign,
    signature_header,
    validate_webhook_url,
    verify_signature,
)

SECRET = b"whsec-test"
LOOPBACK = ["127.0.0.1"]


@dataclass
class Receiver:
    """Answers `script` status codes in turn (then 200) and checks every signature it gets."""

    script: list[int | str] = field(default_factory=list)
    seen: list[dict] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append({"body": body, "headers": dict(request.headers),
                          "valid": verify_signature(body, request.headers.get(SIGNATURE_HEADER, ""), SECRET)})
        action = self.script.pop(0) if self.script else 200
        if action == "slow":
            await asyncio.sleep(2)
            return web.Response(status=200)
        if action == 302:
            raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")
        return web.Response(status=int(action), text="ok" if action == 200 else "nope")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    rec.url = f"http://127.0.0.1:{port}/hook"
    yield rec
    await runner.cleanup()


# ---- URL policy -------------------------------------------------------------------------------
@pytest.mark.parametrize("url, why", [
    ("ftp://example.com/x", "scheme"), ("file:///etc/passwd", "scheme"), ("javascript:alert(1)", "scheme"),
    ("http:///nohost", "no host"), ("http://user:pw@example.com/", "credentials"),
    ("http://127.0.0.1:8000/hook", "loopback"), ("http://localhost/hook", "loopback"),
    ("http://10.1.2.3/", "private"), ("http://192.168.0.10/", "private"), ("http://169.254.169.254/", "link-local"),
    ("http://[::1]/", "loopback"), ("http://[::ffff:127.0.0.1]/", "loopback"), ("http://0.0.0.0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"), ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://no-such-host.invalid/", "does not resolve"), ("http://example.com:99999/", "port"),
])
def test_refused_urls_name_webhook_url(url: str, why: str) -> None:
    with pytest.raises(APIError) as info:
        validate_webhook_url(url, allow_private=False, allow_hosts=[])
    assert (info.value.status, info.value.param) == (400, "webhook_url")
    assert why in info.value.message


def test_allowed_urls() -> None:
    validate_webhook_url("https://93.184.216.34/hook", allow_private=False, allow_hosts=[])  # public literal
    validate_webhook_url("http://127.0.0.1:9/x", allow_private=True, allow_hosts=[])
    validate_webhook_url("http://127.0.0.1:9/x", allow_private=False, allow_hosts=["127.0.0.1"])
    validate_webhook_url("http://LOCALHOST:9/x", allow_private=False, allow_hosts=["localhost"])
    validate_webhook_url("http://10.9.8.7/x", allow_private=False, allow_hosts=["10.0.0.0/8"])
    with pytest.raises(APIError):
        validate_webhook_url("http://10.9.8.7/x", allow_private=False, allow_hosts=["10.0.0.0/16", "other.host"])
    with pytest.raises(APIError):  # the allow-list doesn't lift the scheme rule
        validate_webhook_url("ftp://127.0.0.1/x", allow_private=True, allow_hosts=["127.0.0.1"])


# ---- signatures -------------------------------------------------------------------------------
def test_signature_format_and_verification() -> None:
    body = b'{"id":"job_1"}'
    import hashlib
    import hmac

    assert sign(body, SECRET, 1700000000) == hmac.new(SECRET, b'1700000000.{"id":"job_1"}', hashlib.sha256).hexdigest()
    header = signature_header(body, SECRET, 1700000000)
    assert header == f"t=1700000000,v1={sign(body, SECRET, 1700000000)}"
    assert verify_signature(body, header, SECRET, now=1700000100)
    assert not verify_signature(body, header, SECRET, now=1700000000 + 301)  # outside the replay window
    assert not verify_signature(body + b" ", header, SECRET, now=1700000000)
    assert not verify_signature(body, header, b"other", now=1700000000)
    assert not verify_signature(body, header.replace("t=1700000000", "t=1700000001"), SECRET, now=1700000000)
    assert not verify_signature(body, "garbage", SECRET)
    rotated = f"t=1700000000,v1={'0' * 64},v1={sign(body, SECRET, 1700000000)}"
    assert verify_signature(body, rotated, SECRET, now=1700000000)


# ---- delivery ---------------------------------------------------------------------------------
@pytest.fixture
def log(db_url: str) -> DeliveryLog:  # noqa: F811
    engine = make_engine(db_url)
    upgrade(engine)
    return DeliveryLog(engine)


async def test_retries_until_delivered_and_records_every_attempt(receiver: Receiver, log: DeliveryLog) -> None:
    receiver.script = [500, 503]
    payload = {"id": "job_1", "status": "succeeded", "data": [{"url": "https://x/y.png"}]}
    t0 = time.monotonic()
    ok = await deliver(receiver.url, payload, secret=SECRET, attempts=5, backoff_s=0.1, timeout_s=5,
                       record=log.arecord, job_id="job_1", allow_hosts=LOOPBACK)
    assert ok and len(receiver.seen) == 3
    assert time.monotonic() - t0 >= 0.1 + 0.2  # exponential backoff between attempts
    assert all(s["valid"] for s in receiver.seen)
    assert json.loads(receiver.seen[0]["body"]) == payload
    ids = {s["headers"]["X-Genserve-Delivery"] for s in receiver.seen}
    assert len(ids) == 1  # one event, one id: receivers dedupe on it
    assert [s["headers"]["X-Genserve-Attempt"] for s in receiver.seen] == ["1", "2", "3"]
    rows = log.attempts(job_id="job_1")
    assert [(a.attempt, a.status_code, a.error) for a in rows] == [(1, 500, "HTTP 500"), (2, 503, "HTTP 503"),
                                                                     (3, 200, None)]
    assert {a.delivery_id for a in rows} == ids and all(a.url == receiver.url for a in rows)


async def test_gives_up_after_attempts(receiver: Receiver) -> None:
    receiver.script = [500] * 10
    seen: list[DeliveryAttempt] = []
    ok = await deliver(receiver.url, {"id": "j"}, secret=SECRET, attempts=3, backoff_s=0.01, timeout_s=5,
                       record=seen.append, allow_hosts=LOOPBACK)
    assert not ok and [a.attempt for a in seen] == [1, 2, 3] and len(receiver.seen) == 3


@pytest.mark.parametrize("status, tries", [(400, 1), (410, 1), (302, 1), (429, 3), (408, 3)])
async def test_final_and_retryable_statuses(receiver: Receiver, status: int, tries: int) -> None:
    receiver.script = [status] * 5
    seen: list[DeliveryAttempt] = []
    ok = await deliver(receiver.url, {"id": "j"}, secret=SECRET, attempts=3, backoff_s=0.01, timeout_s=5,
                       record=seen.append, allow_hosts=LOOPBACK)
    assert not ok and len(seen) == tries and seen[0].status_code == status
    assert len(receiver.seen) == tries  # a redirect is never followed


async def test_timeout_is_an_attempt_and_is_retried(receiver: Receiver) -> None:
    receiver.script = ["slow"]
    seen: list[DeliveryAttempt] = []
    ok = await deliver(receiver.url, {"id": "j"}, secret=SECRET, attempts=2, backoff_s=0.01, timeout_s=0.3,
                       record=seen.append, allow_hosts=LOOPBACK)
    assert ok and seen[0].status_code is None and "Timeout" in (seen[0].error or "") and seen[1].ok


async def test_loopback_refused_unless_allowed(receiver: Receiver, log: DeliveryLog) -> None:
    ok = await deliver(receiver.url, {"id": "j"}, secret=SECRET, attempts=3, backoff_s=0.01, record=log.record,
                       job_id="job_ssrf")
    assert not ok and receiver.seen == []
    rows = log.attempts(job_id="job_ssrf")
    assert len(rows) == 1 and rows[0].status_code is None and "loopback" in (rows[0].error or "")


async def test_sender_binds_config_secret_and_log(receiver: Receiver, log: DeliveryLog, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_WEBHOOK_SECRET", SECRET.decode())
    cfg = WebhookConfig(allow_hosts=LOOPBACK, attempts=2, backoff_s=0.01)
    sender = WebhookSender(cfg, work_dir=tmp_path, engine=log.engine)
    await sender.avalidate(receiver.url)
    with pytest.raises(APIError):
        sender.validate("http://10.0.0.1/")
    receiver.script = [502]
    assert await sender.send(receiver.url, {"id": "job_9"}, job_id="job_9")
    assert [a.status_code for a in sender.log.attempts(job_id="job_9")] == [502, 200]
    assert all(s["valid"] for s in receiver.seen)
    monkeypatch.delenv("GENSERVE_WEBHOOK_SECRET")
    a = WebhookSender(WebhookConfig(), work_dir=tmp_path, engine=log.engine)
    b = WebhookSender(WebhookConfig(), work_dir=tmp_path, engine=log.engine)
    assert a.secret == b.secret and len(a.secret) == 64 and a.secret != SECRET
