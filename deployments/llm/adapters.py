"""The LoRA adapters one LLM replica holds: loaded into its engine, reference-counted by the
requests that run them.

Serve's model multiplexing (deployment.py) decides which adapters a replica keeps (at most
`lora.max_adapters_per_replica`, least recently used evicted) and routes requests for an adapter
to replicas that hold it; it calls `evict` when it drops one. Eviction must not pull weights from
under a running sequence, so an evicted adapter leaves the engine when its last request ends. A
request for an adapter that is not loaded (a Server used without Serve, in tests; or one evicted
and asked for again) loads it first. An adapter that comes without a local path is fetched by id
from the replica's `AdapterSource` (deployments/adapters.py; the app binds the registry's store).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from deployments.adapters import AdapterSource
from deployments.llm.types import LLMRequestError, LoRAAdapter


class AdapterEngine(Protocol):
    async def load_adapter(self, adapter: LoRAAdapter) -> None: ...

    async def unload_adapter(self, adapter_id: str) -> None: ...


@dataclass
class _Entry:
    adapter: LoRAAdapter
    refs: int = 0
    evicted: bool = False


def adapter_rank(adapter: LoRAAdapter) -> int:
    """The adapter's rank: given, or `r` of its adapter_config.json (0 if neither says)."""
    if adapter.rank:
        return adapter.rank
    try:
        return int(json.loads((Path(adapter.path) / "adapter_config.json").read_text()).get("r", 0))
    except (OSError, ValueError):
        return 0  # the engine's load reports what is wrong with the directory


class AdapterSet:
    def __init__(self, engine: AdapterEngine, *, max_rank: int, source: AdapterSource | None = None) -> None:
        self._engine = engine
        self._source = source
        self._max_rank = max_rank
        self._entries: dict[str, _Entry] = {}
        self._lock = asyncio.Lock()  # one load or unload at a time (as Serve's multiplexer does)
        self._unloads: set[asyncio.Task[None]] = set()
        self.load_seconds: deque[float] = deque(maxlen=256)  # recent cold loads (stats, benchmark)

    def loaded(self) -> list[str]:
        return sorted(self._entries)

    def in_use(self, adapter_id: str) -> int:
        entry = self._entries.get(adapter_id)
        return entry.refs if entry is not None else 0

    async def load(self, adapter: LoRAAdapter) -> None:
        """Load it into the engine (a no-op if loaded; an evicted one still loaded is kept)."""
        if adapter.id in self._entries:
            self._entries[adapter.id].evicted = False
            return
        if not adapter.path:
            if self._source is None:
                raise RuntimeError(f"LoRA adapter {adapter.id!r} came without a path and this replica has no "
                                   "adapter source to fetch it from")
            path = await asyncio.to_thread(self._source.fetch, adapter.id)
            adapter = dataclasses.replace(adapter, path=str(path))
        rank = adapter_rank(adapter)
        if rank > self._max_rank:
            raise LLMRequestError(400, f"The adapter {adapter.name or adapter.id!r} has rank {rank}; this model "
                                  f"serves ranks up to {self._max_rank} (lora.max_lora_rank).", param="model",
                                  code="adapter_rank_too_large")
        async with self._lock:
            entry = self._entries.get(adapter.id)
            if entry is not None:
                entry.evicted = False
                return
            t0 = time.perf_counter()
            await self._engine.load_adapter(adapter)
            self.load_seconds.append(time.perf_counter() - t0)
            self._entries[adapter.id] = _Entry(adapter)

    @asynccontextmanager
    async def use(self, adapter: LoRAAdapter) -> AsyncIterator[None]:
        """Hold the adapter loaded while the block runs (loading it first if needed)."""
        entry = self._entries.get(adapter.id)
        if entry is None or entry.evicted:
            await self.load(adapter)
            entry = self._entries[adapter.id]
        entry.refs += 1
        try:
            yield
        finally:
            entry.refs -= 1
            if entry.evicted and entry.refs == 0:
                self._unload_soon(adapter.id)

    def evict(self, adapter_id: str) -> None:
        """Serve's multiplexer dropped it: unload now, or when its last request ends."""
        entry = self._entries.get(adapter_id)
        if entry is None:
            return
        entry.evicted = True
        if entry.refs == 0:
            self._unload_soon(adapter_id)

    def _unload_soon(self, adapter_id: str) -> None:
        # A task: `use` may be leaving because its request was cancelled, and an eviction comes
        # from a thread callback; neither can await the engine there.
        task = asyncio.get_running_loop().create_task(self._unload(adapter_id))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _unload(self, adapter_id: str) -> None:
        async with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or not entry.evicted or entry.refs:
                return  # asked for again since, or already gone
            del self._entries[adapter_id]
            await self._engine.unload_adapter(adapter_id)

    async def drain(self) -> None:
        """Wait for the unloads under way (tests, shutdown)."""
        while self._unloads:
            await asyncio.gather(*self._unloads, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        loads = sorted(self.load_seconds)
        return {"loaded": self.loaded(), "in_use": {k: e.refs for k, e in self._entries.items() if e.refs},
                "load_p95_s": loads[int(0.95 * (len(loads) - 1))] if loads else None, "loads": len(loads)}
