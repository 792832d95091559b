"""Usage of streamed responses: count what was actually sent, settle once, also on disconnect.

`metered(adm, chunks, tokens_of=...)` counts a chunk only when the server comes back for the next
one, i.e. after the previous `send` finished; a client that disconnects mid-stream is billed for
what it received. `MeteredStreamingResponse` closes the iterator and settles in `finally`, so
usage is recorded even when Starlette cancels the stream without closing the generator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serve_app.tenancy.service import Admission

T = TypeVar("T")


async def metered(adm: Admission, chunks: AsyncIterator[T], *, tokens_of: Callable[[T], int],
                  usage_of: Callable[[T], dict[str, Any] | None] | None = None) -> AsyncIterator[T]:
    """Yield `chunks`, adding `tokens_of(chunk)` completion tokens once each chunk was sent. If a
    chunk carries an OpenAI `usage` object (`usage_of`), it becomes the authoritative total."""
    status = "ok"
    try:
        async for chunk in chunks:
            yield chunk
            adm.add(completion_tokens=tokens_of(chunk))
            usage = usage_of(chunk) if usage_of is not None else None
            if usage:
                adm.set_usage(usage)
    except (GeneratorExit, anyio.get_cancelled_exc_class()):
        status = "disconnected"
        raise
    except BaseException:
        status = "error"
        raise
    finally:
        await adm.settle(status)


class MeteredStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its iterator and settles its admission, whichever
    way the response ends; carries the admission's x-ratelimit-* headers."""

    def __init__(self, content: AsyncIterator[Any], adm: Admission, **kwargs: Any) -> None:
        headers = {**adm.headers(), **(kwargs.pop("headers", None) or {})}
        super().__init__(content, headers=headers, **kwargs)
        self.admission = adm

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self.admission.settle()  # no-op if `metered` already settled
