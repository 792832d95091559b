"""Webhook signatures, Stripe-style: `X-Genserve-Signature: t=<unix ts>,v1=<hex>` where
hex = HMAC-SHA256(secret, "<ts>.<raw body>"). The timestamp is signed too, so a receiver that
also refuses old timestamps (a replay window, e.g. 5 minutes) can't be fed a recorded request."""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Genserve-Signature"
DEFAULT_TOLERANCE_S = 300


def sign(payload: bytes, secret: bytes, timestamp: int) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()


def signature_header(payload: bytes, secret: bytes, timestamp: int | None = None) -> str:
    ts = int(time.time()) if timestamp is None else timestamp
    return f"t={ts},v1={sign(payload, secret, ts)}"


def verify_signature(payload: bytes, header: str, secret: bytes, *, tolerance_s: int = DEFAULT_TOLERANCE_S,
                     now: float | None = None) -> bool:
    """What a receiver runs: parse the header, check the timestamp is recent, compare in constant time."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        k, _, v = part.strip().partition("=")
        fields.setdefault(k, []).append(v)
    try:
        ts = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = sign(payload, secret, ts)
    # Several v1 entries are allowed (secret rotation: the sender signs with old and new).
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))
