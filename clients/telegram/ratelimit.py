"""A per-user sliding-window limit inside the bot, so one chat can't use up the bot's tenant."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable


class UserRateLimiter:
    def __init__(self, max_events: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.max_events = max_events
        self.window_s = window_s
        self._clock = clock
        self._events: dict[int, deque[float]] = defaultdict(deque)

    def try_acquire(self, user_id: int) -> float | None:
        """None when allowed (and counted); else the seconds until the user may try again."""
        now = self._clock()
        events = self._events[user_id]
        while events and now - events[0] >= self.window_s:
            events.popleft()
        if len(events) >= self.max_events:
            return max(0.0, self.window_s - (now - events[0]))
        events.append(now)
        return None

    def refund(self, user_id: int) -> None:
        """Give back the last event (a request the API rejected as invalid costs the user nothing)."""
        events = self._events.get(user_id)
        if events:
            events.pop()
