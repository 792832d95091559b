"""GPU-seconds of LLM requests under continuous batching: a processor-sharing "share clock".

The engine runs all active sequences of a replica together, so no request has a GPU time of its
own. Processor sharing splits the replica's busy time equally among what is active at each
instant: a replica-local accumulator S grows by dt/N over every interval in which N > 0 units are
active (N changes only when a request enters or leaves). A request of weight w (its `n` choices)
that was active from S_start to S_end had w·(S_end − S_start) of the replica's time; summed over
all requests that is exactly the time N > 0 (the busy time), however requests overlap.

GPU-seconds = that share × the replica's GPUs (`num_gpus` of the deployment, read from Ray's
assigned resources; a replica without GPUs (CPU) counts 1.0, so on CPU the figure is replica-
seconds). The split is per concurrent sequence, not per token: a long prompt's prefill and a short
one's decode get the same share of the same instant. Time a request waits inside the engine (its
queue, e.g. beyond vLLM's max_num_seqs) counts as active; the replica is busy for it.

Used only from the replica's event loop (no locking). No Ray import at module level.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any


class ShareClock:
    """One per replica. `enter(weight)` when a request starts on the engine, `Share.leave()` when
    it ends (always: in `finally`)."""

    def __init__(self, gpus: float = 1.0, now: Callable[[], float] = time.monotonic) -> None:
        if gpus <= 0:
            raise ValueError(f"gpus must be > 0, got {gpus}")
        self.gpus = gpus
        self._now = now
        self._s = 0.0  # the accumulator S (seconds per unit of weight)
        self._active = 0  # N: the weight of the requests active now
        self._t = now()  # when S was last brought up to date
        self.busy_s = 0.0  # wall time with N > 0 (what all shares add up to)

    def _advance(self) -> float:
        t = self._now()
        if self._active > 0:
            dt = max(0.0, t - self._t)
            self._s += dt / self._active
            self.busy_s += dt
        self._t = t
        return self._s

    @property
    def active(self) -> int:
        return self._active

    def read(self) -> float:
        """S now, without changing anything but bringing S up to date (N is unchanged)."""
        return self._advance()

    def enter(self, weight: int = 1) -> Share:
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        start = self._advance()
        self._active += weight
        return Share(self, start, weight)

    def _leave(self, weight: int) -> float:
        end = self._advance()
        self._active -= weight
        return end


class Share:
    """One request's place on the clock."""

    __slots__ = ("_clock", "_start", "_end", "weight")

    def __init__(self, clock: ShareClock, start: float, weight: int) -> None:
        self._clock, self._start, self.weight = clock, start, weight
        self._end: float | None = None

    def gpu_seconds(self) -> float:
        """The request's GPU-seconds so far (final once it left)."""
        s = self._end if self._end is not None else self._clock.read()
        return self.weight * (s - self._start) * self._clock.gpus

    def leave(self) -> float:
        """End the request's share (idempotent); returns its GPU-seconds."""
        if self._end is None:
            self._end = self._clock._leave(self.weight)
        return self.gpu_seconds()


def replica_gpus() -> float:
    """GPUs Ray assigned to this process (a Serve replica's `num_gpus`); 1.0 when none (CPU) or
    outside a Ray worker."""
    try:
        import ray

        if ray.is_initialized():
            gpus = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))  # type: ignore[no-untyped-call, unused-ignore]  # Ray is untyped; used under --strict only
            if gpus > 0:
                return gpus
    except Exception:  # noqa: BLE001 - the driver or an old Ray: fall back to the CPU figure
        pass
    return 1.0


_clocks: weakref.WeakKeyDictionary[Any, ShareClock] = weakref.WeakKeyDictionary()


def clock_for(owner: Any) -> ShareClock:
    """The share clock of `owner` (the replica's server object), created on first use."""
    clock = _clocks.get(owner)
    if clock is None:
        clock = _clocks[owner] = ShareClock(replica_gpus())
    return clock
