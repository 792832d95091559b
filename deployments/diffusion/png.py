"""PNG output: the one place an `ImageResult` is built from a denoised image, with the task's
generation parameters as PNG text chunks when the task asks for them (`ImageTask.embed_metadata`;
off by default for privacy).

Kept free of torch so that encoding (which runs off the denoising thread, in the deployment's
PNG pool) and its tests import quickly.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from deployments.diffusion.types import ImageResult, ImageTask, WeightedPrompt


def encode_png(image: Image.Image, params: dict[str, Any], *, compress_level: int = 6) -> bytes:
    """PNG bytes with each of `params` stored as a text chunk (non-Latin-1 text as iTXt)."""
    info = PngInfo()
    for key, value in params.items():
        info.add_text(key, str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def format_weighted(parts: Sequence[WeightedPrompt]) -> str:
    return " ".join(f"{p.text}::{p.weight:g}" for p in parts)


def png_params(task: ImageTask, model: str) -> dict[str, Any]:
    """The text chunks of a task's PNG: none unless the task asks (`embed_metadata`), since whoever
    holds a result URL can read them (prompt, negative prompt, seed)."""
    if not task.embed_metadata:
        return {}
    params: dict[str, Any] = {
        "prompt": task.prompt,
        "negative_prompt": task.negative_prompt,
        "seed": task.seed,
        "steps": task.steps,
        "guidance_scale": task.guidance_scale,
        "model": model,
        "width": task.width,
        "height": task.height,
    }
    if task.tile:
        params["tile"] = True
    if task.quality != "default":
        params["quality"] = task.quality
    if task.weighted_prompts:
        params["weighted_prompts"] = format_weighted(task.weighted_prompts)
    return params


def image_result(task: ImageTask, image: Image.Image, *, model: str, batch_size: int, compute_s: float,
                 queue_wait_s: float = 0.0, compress_level: int = 6) -> ImageResult:
    """The `ImageResult` of one denoised image: PNG bytes (with `png_params`) plus what was used."""
    return ImageResult(png=encode_png(image, png_params(task, model), compress_level=compress_level),
                       seed=task.seed, width=image.width, height=image.height, steps=task.steps,
                       guidance_scale=task.guidance_scale, model=model, batch_size=batch_size,
                       compute_s=compute_s, queue_wait_s=queue_wait_s, quality=task.quality)
