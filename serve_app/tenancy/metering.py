"""Usage of streamed responses: count what was actually sent, settle once, also on disconnect.

`metered(adm, chunks, tokens_of=...)` counts a chunk only when the server comes back for the next
one, i.e. after the previous `send` finished; a client that disconnects mid-stream is billed for
what it received. `MeteredStreamingResponse` starts the settle in `finally` before anything that
can be cancelled, then closes the iterator: usage is recorded once even when the stream is cancelled
(repeatedly) without its generator being closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serve_app.tenancy.service import Admission, status_of

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
    way the response ends; carries the admission's x-ratelimit-* headers. A stream that did not
    reach its end (client gone, server cancelling) is recorded `disconnected`, a failure `error`
    (unless `metered` settled first with its own finding)."""

    def __init__(self, content: AsyncIterator[Any], adm: Admission, **kwargs: Any) -> None:
        headers = {**adm.headers(), **(kwargs.pop("headers", None) or {})}
        self._source, self._complete = content, False
        super().__init__(self._until_end(content), headers=headers, **kwargs)
        self.admission = adm

    async def _until_end(self, content: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for item in content:
            yield item  # returns here only once the item was sent
        self._complete = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ended: BaseException | None = None
        try:
            await super().__call__(scope, receive, send)
        except BaseException as e:
            ended = e
            raise
        finally:
            if self._complete:
                status = None
            elif ended is None or isinstance(ended, (OSError, ClientDisconnect)) or status_of(ended) != "error":
                status = "disconnected"  # the disconnect listener ended it, the socket is gone, or cancelled
            else:
                status = "error"
            # Handed to a worker thread here and now: it runs whatever cancels arrive from now on.
            self.admission.settle_soon(status)  # no-op if `metered` already settled
            with anyio.CancelScope(shield=True):
                try:
                    for it in (self.body_iterator, self._source):
                        aclose = getattr(it, "aclose", None)
                        if aclose is not None:
                            await aclose()
                finally:
                    await self.admission.settle()  # waits for the settle started above
