"""Keep the leases of running requests alive; let those of dead or leaked ones run out.

Every concurrency slot and budget hold carries a lease that expires `lease_ttl_s` after its last
renewal. One thread per process (per `Tenancy`) renews the leases of all its open admissions every
`lease_renew_s` in one statement per table (and one Redis script per tenant), then sweeps expired
leases, so a slot held by a process that died — or by an admission that was dropped without being
settled — is freed about `lease_ttl_s` later, while a request (or an image job) that runs for an
hour keeps its slot. Admissions are held weakly: an admission garbage-collected without a settle
stops being renewed, which is exactly what lets its lease expire.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("genserve.tenancy")


class LeaseKeeper:
    def __init__(self, renew: Callable[[list[Any]], None], sweep: Callable[[], None], every_s: float) -> None:
        self._renew, self._sweep, self.every_s = renew, sweep, every_s
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, admission: Any) -> None:
        with self._lock:
            self._open.add(admission)
            if self._thread is None and not self._stop.is_set():  # started by the first admission
                self._thread = threading.Thread(target=self._run, name="genserve-lease-keeper", daemon=True)
                self._thread.start()

    def forget(self, admission: Any) -> None:
        with self._lock:
            self._open.discard(admission)

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def renew_now(self) -> None:
        with self._lock:
            admissions = list(self._open)
        if admissions:
            self._renew(admissions)
        self._sweep()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.renew_now()
            except Exception:  # database or Redis away: retry next round; leases last lease_ttl_s
                logger.warning("could not renew the leases of running requests", exc_info=True)

    def stop(self) -> None:
        """Stop renewing (process shutdown). Leases still open then expire after lease_ttl_s."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
