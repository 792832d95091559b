"""Shared vocabulary of the rate limiters (SQL and Redis) and the OpenAI-style headers.

A request asks for `Need`s: units of a kind (requests, tokens, images) in the current fixed window.
All needs and the concurrency slot are taken atomically, all or nothing, so a request refused on
images does not eat a request slot: exactly L admitted per window, whatever the replica count.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

KINDS = ("requests", "tokens", "images")


@dataclass(frozen=True)
class Need:
    kind: str
    amount: int
    limit: int


@dataclass
class Grant:
    """What an admission holds: the window it counted in, and the concurrency lease if any."""

    window_start: int
    window_s: int
    used: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (limit, used after)
    taken: dict[str, int] = field(default_factory=dict)  # kind -> amount counted
    lease_id: str | None = None

    @property
    def reset_at(self) -> float:
        return float(self.window_start + self.window_s)


class Rejected(Exception):
    """A limit said no. `kind` is a rate kind or "concurrency"."""

    def __init__(self, kind: str, limit: int, used: int, retry_after_s: float, too_large: bool = False):
        super().__init__(kind)
        self.kind, self.limit, self.used = kind, limit, used
        self.retry_after_s = retry_after_s
        self.too_large = too_large


def window_start(now: float, window_s: int) -> int:
    return int(now // window_s) * window_s


def format_reset(seconds: float) -> str:
    """OpenAI's duration style: '850ms', '17s', '6m0s'."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = math.ceil(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60}s"


def ratelimit_headers(grant: Grant, now: float | None = None) -> dict[str, str]:
    now = time.time() if now is None else now
    reset = format_reset(max(0.0, grant.reset_at - now))
    out: dict[str, str] = {}
    for kind, (limit, used) in grant.used.items():
        out[f"x-ratelimit-limit-{kind}"] = str(limit)
        out[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
        out[f"x-ratelimit-reset-{kind}"] = reset
    return out
