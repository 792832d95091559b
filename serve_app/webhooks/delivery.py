"""POST a signed JSON event to a webhook URL, retrying with exponential backoff; every attempt
is handed to `record` (the `webhook_deliveries` table in production).

Each attempt goes through the URL guard (serve_app/netguard): the host is resolved once, every
address checked, and the POST connects to a checked address only, so a name that rebinds to
127.0.0.1 between the check and the connect can't redirect a signed request into loopback.

Retried: network errors, timeouts, 5xx, 408/409/425/429. Not retried: other 4xx and 3xx
(redirects are never followed: they could point into the private network), and a URL that no
longer passes the guard (DNS may have changed since the job was accepted).
"""

from __future__ import annotations

import inspect
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx

from serve_app.netguard import UrlGuard, URLRefused
from serve_app.webhooks.signing import SIGNATURE_HEADER, signature_header
from serve_app.webhooks.urls import webhook_guard

logger = logging.getLogger("genserve.webhooks")

RETRYABLE_4XX = {408, 409, 425, 429}


@dataclass(frozen=True)
class DeliveryAttempt:
    delivery_id: str  # the same for every retry of one event: receivers dedupe on it
    job_id: str | None
    url: str
    attempt: int
    status_code: int | None
    error: str | None
    duration_s: float
    created_at: datetime

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


Recorder = Callable[[DeliveryAttempt], Any]  # sync, or async (awaited)


def encode_payload(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str).encode()


async def _record(record: Recorder | None, attempt: DeliveryAttempt) -> None:
    if record is None:
        return
    try:
        result = record(attempt)
        if inspect.isawaitable(result):
            await result
    except Exception:  # a failed bookkeeping write must not turn a delivered webhook into a failure
        logger.exception("could not record webhook attempt %d of %s", attempt.attempt, attempt.delivery_id)


async def deliver(url: str, payload: dict[str, Any], *, secret: bytes | str, attempts: int = 5,
                  backoff_s: float = 2.0, timeout_s: float = 10.0, record: Recorder | None = None,
                  job_id: str | None = None, max_backoff_s: float = 300.0, allow_private: bool = False,
                  allow_hosts: Sequence[str] = (), delivery_id: str | None = None,
                  guard: UrlGuard | None = None) -> bool:
    """True once the receiver answers 2xx; False when attempts run out or the failure is final.
    `guard` defaults to one built from `allow_private`/`allow_hosts` (tests pass one with a resolver)."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    key = secret.encode() if isinstance(secret, str) else secret
    body = encode_payload(payload)
    did = delivery_id or "whd_" + secrets.token_hex(12)
    guard = guard or webhook_guard(allow_private=allow_private, allow_hosts=allow_hosts)
    for n in range(1, attempts + 1):
        t0, status, error, final = time.monotonic(), None, None, False
        created = datetime.now(UTC)
        try:
            headers = {"Content-Type": "application/json", "User-Agent": "genserve-webhooks/1",
                       SIGNATURE_HEADER: signature_header(body, key), "X-Genserve-Delivery": did,
                       "X-Genserve-Attempt": str(n)}
            r = await guard.post(url, content=body, headers=headers, timeout_s=timeout_s)
            status = r.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
                final = status < 500 and status not in RETRYABLE_4XX
        except URLRefused as e:
            error, final = f"webhook_url is not allowed: {e}", True
        except TimeoutError:
            error = f"Timeout: no answer within {timeout_s:g}s"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        attempt = DeliveryAttempt(did, job_id, url, n, status, error, round(time.monotonic() - t0, 4), created)
        await _record(record, attempt)
        if attempt.ok:
            return True
        logger.warning("webhook %s attempt %d/%d to %s failed: %s", did, n, attempts, url, error)
        if final or n == attempts:
            return False
        await anyio.sleep(min(max_backoff_s, backoff_s * 2 ** (n - 1)))
    return False
