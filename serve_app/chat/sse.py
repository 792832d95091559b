"""Server-sent events framing for OpenAI-style streams: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`.

A failure after the stream started can't change the HTTP status any more, so it is sent as one
error chunk in the error JSON shape, followed by `[DONE]`: the client sees why, not a cut socket.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from serve_app.errors import APIError

logger = logging.getLogger("genserve.sse")

DONE = "data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: BaseModel | dict[str, Any]) -> str:
    body = payload.model_dump_json(exclude_none=False) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


def error_event(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        return event(exc.body())
    logger.error("stream failed: %r", exc)
    err = APIError(500, "The model failed while generating this response.", type="server_error",
                   code="generation_failed")
    return event(err.body())


async def sse(chunks: AsyncIterator[BaseModel | dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield event(chunk)
    except Exception as exc:  # CancelledError (client gone) is a BaseException: not caught
        yield error_event(exc)
    yield DONE
