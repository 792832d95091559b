"""Reading an LLM engine's stream in tests: every token id and the finish reason."""

from __future__ import annotations

import asyncio
from typing import Any


async def tokens(engine: Any, rid: str, prompt: list[int], sampling: Any, started: asyncio.Event | None = None,
                 after: int = 0) -> tuple[list[int], str | None]:
    """All token ids of one sequence and its finish reason; sets `started` once `after` tokens came."""
    out: list[int] = []
    reason = None
    async for d in engine.generate(rid, prompt, sampling):
        out.extend(d.token_ids)
        reason = d.finish_reason or reason
        if started is not None and len(out) >= after:
            started.set()
    return out, reason
