"""`"stream": true` on the image routes: OpenAI's image streaming events over server-sent events.

Each image sends its `partial_images` previews as `<kind>.partial_image` events, then
`<kind>.completed` with the image (`kind`: `image_generation` for `/v1/images/generations`,
`image_edit` for `/v1/images/edits`). The shape is OpenAI's (`b64_json`, `partial_image_index`,
`size`, `quality`, `background`, `output_format`, `created_at`, `usage`), so the official client's
`images.generate(..., stream=True)` parses it; genserve adds `image_index` (which of the `n`
images, their events interleave), `seed` and `revised_prompt`. `usage` counts no tokens (images
are billed per image and GPU-second): its token fields are 0, `images` and `gpu_seconds` are ours.

Everything that can refuse the request answers with an HTTP status before the stream starts
(`check_request`, `ImagesService.prepare`, admission, `enhance`); a failure after that is one
`error` event in OpenAI's error shape (the client raises `APIError`), never a cut stream. A client
that disconnects cancels its images: the Serve calls are cancelled and the replica drops each one
at its next step (deployments/diffusion/progress.py), as a cancelled job's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from deployments.diffusion.types import ImageResult, ImageTask, PartialImage
from serve_app.chat.sse import HEADERS, MEDIA_TYPE
from serve_app.errors import APIError, bad_request, is_server_fault
from serve_app.images.service import gpu_seconds, map_backend_error
from serve_app.tenancy import MeteredStreamingResponse
from serve_app.tenancy.service import status_of
from telemetry import tracing

if TYPE_CHECKING:
    from serve_app.images.protocol import ImageGenerationRequest
    from serve_app.images.service import ImagesService, PreparedImages
    from serve_app.tenancy import Admission

logger = logging.getLogger("genserve.images.stream")

Kind = Literal["image_generation", "image_edit"]
QUALITIES = ("low", "medium", "high", "auto")  # OpenAI's values; others (genserve's `draft`...) echo `auto`


def check_request(body: ImageGenerationRequest, *, route: str = "/v1/images/generations") -> None:
    """400 for combinations the stream can't honour, before anything is rendered or admitted."""
    if body.stream and body.response_format == "url":
        raise bad_request(f"{route} streams images as `b64_json` only; drop response_format or stream.",
                          param="response_format", code="unsupported_with_stream")
    if body.partial_images and not body.stream:
        raise bad_request("partial_images needs `stream: true` (or submit a job and read GET /v1/jobs/{id}/preview).",
                          param="partial_images", code="partial_images_without_stream")


def _frame(payload: dict[str, Any]) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _error_frame(exc: BaseException, model: str) -> str:
    err = exc if isinstance(exc, APIError) else map_backend_error(exc, model)  # type: ignore[arg-type]
    if not isinstance(exc, APIError):
        logger.warning("image stream failed: %s", type(exc).__name__)
    return _frame({"type": "error", **err.body()})


async def image_events(handle: Any, tasks: tuple[ImageTask, ...]
                       ) -> AsyncIterator[tuple[int, dict[str, int] | PartialImage | ImageResult]]:
    """(image index, event) of every image's replica stream, as they come. Leaving the iteration
    early (a client gone, an error) cancels every image's Serve call: awaiting tasks that are
    cancelled does not cancel a remote stream by itself (see jobs/runner.py)."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, task: ImageTask) -> None:
        stream = handle.options(stream=True).generate_stream.remote(task)
        try:
            async for event in stream:
                queue.put_nowait((i, event))
            queue.put_nowait((i, done))
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer, who ends the stream with it
            queue.put_nowait((i, e))

    pumps = [asyncio.ensure_future(pump(i, t)) for i, t in enumerate(tasks)]
    try:
        left = len(pumps)
        while left:
            i, event = await queue.get()
            if event is done:
                left -= 1
            elif isinstance(event, Exception):
                raise event
            else:
                yield i, event
    finally:
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def stream_images(images: ImagesService, prepared: PreparedImages, admission: Admission, *,
                        kind: Kind = "image_generation", quality: str | None = None) -> MeteredStreamingResponse:
    """The SSE response of a request that passed `prepare` and its admission (settled by the
    response however it ends; settled here if the stream can't start)."""
    stream_id = uuid.uuid4().hex[:16]
    try:
        prepared = await images.enhance(prepared)  # a 429 for its tokens is still an HTTP status
        spec = prepared.spec
        handle = images.handle_for(spec)  # multiplexed by adapter set, as unstreamed calls are
        # The input images (an edit's, an image prompt's) ride in the tasks, as on the unstreamed route.
        tasks = spec.tasks([f"stream-{stream_id}:{i}" for i in range(spec.n)], trace_context=tracing.outgoing(),
                           images=prepared.images)
    except BaseException as e:
        admission.refund_request = is_server_fault(e)
        await admission.settle(status_of(e))
        raise
    common = {"size": f"{spec.width}x{spec.height}", "quality": quality if quality in QUALITIES else "auto",
              "background": "opaque", "output_format": "png"}

    async def frames() -> AsyncIterator[str]:
        results: list[ImageResult | None] = [None] * spec.n
        partials = [0] * spec.n
        try:
            async for i, event in image_events(handle, tasks):
                now = int(time.time())
                if isinstance(event, PartialImage):
                    yield _frame({"type": f"{kind}.partial_image", "b64_json": base64.b64encode(event.png).decode(),
                                  "partial_image_index": partials[i], **common, "created_at": now, "image_index": i,
                                  "step": event.step, "total_steps": event.total})
                    partials[i] += 1
                elif isinstance(event, ImageResult):
                    results[i] = event
                    seconds = gpu_seconds([event])
                    admission.add(images=1, gpu_seconds=seconds)
                    usage = {"input_tokens": 0, "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
                             "output_tokens": 0, "total_tokens": 0, "images": 1, "gpu_seconds": round(seconds, 6)}
                    yield _frame({"type": f"{kind}.completed", "b64_json": base64.b64encode(event.png).decode(),
                                  **common, "created_at": now, "usage": usage, "image_index": i, "seed": event.seed,
                                  "revised_prompt": spec.prompt})
        except Exception as e:  # noqa: BLE001 - after the headers went out, an error is an event
            admission.status, admission.refund_request = "error", is_server_fault(e)
            yield _error_frame(e, spec.model)
            return
        done = [r for r in results if r is not None]
        try:  # the generation log (no upload: the stream carried the images)
            await images.deliver(spec, done, tenant_id=prepared.tenant.tenant_id, store=False,
                                 latency_s=time.monotonic() - prepared.started)
        except Exception:  # noqa: BLE001 - the images were sent and billed; a lost log line is only logged
            logger.exception("image stream %s: generation log failed", stream_id)

    return MeteredStreamingResponse(frames(), admission, media_type=MEDIA_TYPE, headers=HEADERS)


__all__ = ["Kind", "check_request", "image_events", "stream_images"]
