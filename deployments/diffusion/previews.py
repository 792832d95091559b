"""Partial images: previews of images while they denoise (`ImageTask.partial_images`), decoded by a
tiny VAE (`AutoencoderTiny`, TAESD-style) beside the denoising loop, never in it.

How it stays off the critical path:
- The hook wraps the scheduler's `step` for one pipeline call (`PreviewDecoder.capture`). At a
  preview step it copies the rows of the tasks that want one (the scheduler's prediction of the
  clean image, `pred_original_sample`, when it returns one: a preview at step 5 of 30 then shows
  the picture to come, not noise), records a CUDA event and hands both to a one-thread pool. The
  denoising thread only queued a copy kernel: it never waits.
- The worker decodes on its own CUDA stream (`torch.cuda.Stream`), ordered after the event, so the
  tiny VAE's kernels run beside the UNet's instead of between two steps; it then copies the pixels
  to the host (waiting on its own stream only), downscales, encodes the PNG and hands it to `emit`
  (which crosses to the event loop). On CPU the same thread decodes beside the loop.
- A thread rather than a process: the decode is a few small convolutions whose kernels release the
  GIL; the worker's Python is a few hundred microseconds per preview.
A failing preview is logged and dropped: it never fails its image. `flush` lets the caller deliver
a task's last previews before its final image.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from deployments.diffusion.config import PreviewsConfig
from deployments.diffusion.hooks import LiveRows
from deployments.diffusion.loading import DTYPES
from deployments.diffusion.types import ImageTask, PartialImage

logger = logging.getLogger("genserve.diffusion.previews")

OnPreview = Callable[[str, PartialImage], None]
PREVIEW_PNG_LEVEL = 1  # fast zlib: previews are short-lived


def preview_steps(total: int, count: int) -> tuple[int, ...]:
    """The steps (1-based, after which a preview is decoded) for `count` previews of a `total`-step
    loop: evenly spaced, never the last step (that is the final image), so fewer when the loop is
    shorter than `count + 1` steps (OpenAI's partial images may be fewer than asked, too)."""
    if count <= 0 or total < 2:
        return ()
    return tuple(sorted({min(total - 1, max(1, round(total * j / (count + 1)))) for j in range(1, count + 1)}))


def _denoised(out: Any) -> torch.Tensor:
    """The scheduler step's estimate of the clean latents, else its next latents."""
    if isinstance(out, tuple):
        first: torch.Tensor = out[0]
        if len(out) > 1 and isinstance(out[1], torch.Tensor) and out[1].shape == first.shape:
            return out[1]
        return first
    pred = getattr(out, "pred_original_sample", None)
    nxt: torch.Tensor = out.prev_sample
    return pred if isinstance(pred, torch.Tensor) else nxt


class PreviewDecoder:
    """One replica's preview decoder: the tiny VAE, its worker thread and (CUDA) side stream."""

    def __init__(self, vae: Any, *, max_side: int | None = None) -> None:
        self.vae = vae
        self.max_side = max_side
        self.device = torch.device(vae.device)
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # type: ignore[no-untyped-call, unused-ignore]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preview")
        self._pending: dict[str, list[Future[None]]] = {}
        self._lock = threading.Lock()
        self.decoded = 0
        self.failed = 0

    @classmethod
    def load(cls, config: PreviewsConfig, *, dtype: str, device: str) -> PreviewDecoder:
        from diffusers import AutoencoderTiny

        source = config.vae
        local = Path(source).expanduser()
        if local.exists() or source.startswith(("/", ".", "~")):
            if not (local / "config.json").is_file():
                raise ValueError(f"previews.vae {source!r} is not an AutoencoderTiny directory (no config.json)")
            source = str(local)
        vae = AutoencoderTiny.from_pretrained(source, dtype=DTYPES[dtype], use_safetensors=True)  # type: ignore[no-untyped-call, unused-ignore]
        return cls(vae.to(device).eval(), max_side=config.max_side)

    # -- the denoising thread ---------------------------------------------------------------------

    @contextmanager
    def capture(self, scheduler: Any, tasks: Sequence[ImageTask], rows: LiveRows, emit: OnPreview) -> Iterator[None]:
        """Within one pipeline call: after each of the preview steps of a task still in the batch,
        queue the decode of its rows. `rows.live` maps batch rows to `tasks` (cancelled tasks leave)."""
        wanting = [j for j, t in enumerate(tasks) if t.partial_images > 0 and t.task_id is not None]
        if not wanting:
            yield
            return
        original = scheduler.step
        shadowed = scheduler.__dict__.get("step")
        calls = 0
        plans: dict[int, tuple[int, ...]] = {}
        total = 0

        def step(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls, total
            out = original(*args, **kwargs)
            if calls == 0:  # the loop's length (img2img starts part-way: begin_index)
                total = len(scheduler.timesteps) - int(getattr(scheduler, "begin_index", None) or 0)
                plans.update({j: preview_steps(total, tasks[j].partial_images) for j in wanting})
            calls += 1
            due = [(pos, j) for pos, j in enumerate(rows.live) if calls in plans.get(j, ())]
            if due:
                self._submit(_denoised(out), [(pos, tasks[j], plans[j].index(calls)) for pos, j in due],
                             calls, total, emit)
            return out

        scheduler.step = step
        try:
            yield
        finally:
            if shadowed is None:
                del scheduler.step
            else:
                scheduler.step = shadowed

    def _submit(self, latents: torch.Tensor, due: list[tuple[int, ImageTask, int]], step: int, total: int,
                emit: OnPreview) -> None:
        rows = latents[[pos for pos, _, _ in due]].detach().clone()  # queued on the loop's stream; no wait
        ready = None
        if self._side is not None:
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call, unused-ignore]
            ready.record()
        targets = [(t.task_id or "", index) for _, t, index in due]  # only tasks with an id are captured
        future = self._pool.submit(self._decode, rows, ready, targets, step, total, emit)
        with self._lock:
            for task_id, _ in targets:
                self._pending.setdefault(task_id, []).append(future)

    # -- the worker thread ------------------------------------------------------------------------

    def _pixels(self, latents: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]  # in [-1, 1]
        return (out.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

    def _decode(self, latents: torch.Tensor, ready: Any, targets: list[tuple[str, int]], step: int, total: int,
                emit: OnPreview) -> None:
        try:
            with torch.inference_mode():
                if self._side is not None:
                    with torch.cuda.stream(self._side):
                        self._side.wait_event(ready)
                        latents.record_stream(self._side)
                        pixels = self._pixels(latents)  # .cpu() waits for this stream only
                else:
                    pixels = self._pixels(latents)
            for (task_id, index), row in zip(targets, pixels, strict=True):
                image = Image.fromarray(row.numpy())
                if self.max_side is not None and max(image.size) > self.max_side:
                    image.thumbnail((self.max_side, self.max_side), Image.Resampling.BILINEAR)
                buf = io.BytesIO()
                image.save(buf, format="PNG", compress_level=PREVIEW_PNG_LEVEL)
                emit(task_id, PartialImage(index=index, step=step, total=total, png=buf.getvalue(),
                                           width=image.width, height=image.height))
                self.decoded += 1
        except Exception:  # noqa: BLE001 - a preview must never fail its image
            self.failed += 1
            logger.exception("preview decode failed (step %d of %d); dropped", step, total)

    # -- the caller (event loop) ------------------------------------------------------------------

    async def flush(self, task_id: str) -> None:
        """Wait until `task_id`'s queued previews were emitted (before its final image is sent)."""
        with self._lock:
            pending = self._pending.pop(task_id, [])
        for future in pending:
            await asyncio.wrap_future(future)

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._pending.pop(task_id, None)

    def stats(self) -> dict[str, int]:
        return {"previews_decoded": self.decoded, "previews_failed": self.failed}


__all__ = ["OnPreview", "PreviewDecoder", "preview_steps"]
