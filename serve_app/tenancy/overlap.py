"""Which requests may overlap their admission with the model's first work.

A streamed chat request normally waits for admission (rate windows, concurrency slot, budget hold:
one database transaction) before the LLM replica sees it; that wait is part of its time to first
token. Overlapped, the replica starts (template, prefill) while the database decides, and a
refusal cancels the generation before any token is sent. Admission itself is unchanged — the same
transaction, the same exact limits, nothing billed for a refused request — so the only cost of a
refusal is the model work thrown away. This guard bounds it: a tenant refused on this replica
waits `cooldown_s` before it may overlap again, and at most `max_in_flight` of a tenant's requests
overlap at once, so a tenant hammering past its limits gets sequential admission, not free prefills.
"""

from __future__ import annotations

import time
from collections import Counter


class OverlapGuard:
    """Per process; call `enter` before overlapping and `leave` once admission has answered."""

    def __init__(self, *, cooldown_s: float, max_in_flight: int = 4) -> None:
        self.cooldown_s = cooldown_s
        self.max_in_flight = max_in_flight
        self._refused_at: dict[int, float] = {}
        self._in_flight: Counter[int] = Counter()

    def enter(self, tenant_id: int) -> bool:
        """True (and counted) if this tenant's request may overlap now."""
        refused = self._refused_at.get(tenant_id)
        if refused is not None:
            if time.monotonic() - refused < self.cooldown_s:
                return False
            del self._refused_at[tenant_id]
        if self._in_flight[tenant_id] >= self.max_in_flight:
            return False
        self._in_flight[tenant_id] += 1
        return True

    def leave(self, tenant_id: int, *, refused: bool) -> None:
        self._in_flight[tenant_id] -= 1
        if self._in_flight[tenant_id] <= 0:
            del self._in_flight[tenant_id]
        if refused:
            self._refused_at[tenant_id] = time.monotonic()
