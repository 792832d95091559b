"""What the bot says: greetings, progress lines, captions and friendly errors (no tracebacks)."""

from __future__ import annotations

import math
from typing import Any

from clients.telegram.api import GenserveError

HELP = (
    "This bot draws a picture from your description.\n\n"
    "/txt2img: describe an image and get it back\n"
    "/templates: start from a ready-made prompt template\n"
    "/settings: choose the model, the aspect ratio, and whether to enhance prompts\n"
    "/cancel: stop what you are doing\n\n"
    "Send a photo with a caption to draw from that photo: the caption is the prompt and the picture "
    "starts from your photo (add --iw 0-3 to the caption: higher keeps more of the photo).\n\n"
    "Write descriptions in English. Parameters work too, e.g.\n"
    "a lighthouse at dawn --ar 16:9 --no people --seed 7\n"
    "Add --enhance to have the prompt expanded by the language model first."
)
ASK_PROMPT = "Describe the image (in English). Parameters like --ar 3:2 or --no text are welcome."
PHOTO_NEEDS_CAPTION = (
    "Nice photo! To draw from it, send it again with a caption that describes the picture you want, "
    "e.g. \"the same scene as a watercolor --iw 1.5\" (--iw 0-3: higher keeps more of the photo)."
)
PHOTO_DOWNLOAD_FAILED = "😕 I couldn't fetch your photo from Telegram. Please send it again."
CAPTION_LIMIT = 1024  # Telegram's caption limit


def greeting(first_name: str | None) -> str:
    return f"Hi {first_name or 'there'}! The bot is ready. Send /txt2img to draw something, /help for more."


def progress_text(job: dict[str, Any]) -> str:
    status = job.get("status")
    if status == "queued":
        pos = job.get("queue_position")
        eta = job.get("estimated_seconds")
        where = f" ({pos} ahead of you)" if isinstance(pos, int) and pos > 0 else ""
        wait = f", about {math.ceil(eta)} s" if isinstance(eta, (int, float)) and eta > 0 else ""
        return f"⏳ queued{where}{wait}…"
    if status == "running":
        return f"🎨 generating… {round(100 * float(job.get('progress') or 0))} %"
    if status == "succeeded":
        return "✅ done: 100 %"
    if status == "cancelled":
        return "🛑 cancelled."
    return f"❌ generation failed: {job.get('error') or 'no reason given'}"


def caption(job: dict[str, Any], index: int) -> str:
    params = job.get("params") or {}
    results = job.get("results") or []
    seed = results[index].get("seed") if index < len(results) else None
    parts = [f"seed {seed}", str(job.get("model", "?"))]
    if params.get("width") and params.get("height"):
        parts.append(f"{params['width']}×{params['height']}")
    if params.get("steps"):
        parts.append(f"{params['steps']} steps")
    guidance = params.get("guidance_scale")
    if isinstance(guidance, list) and index < len(guidance):
        parts.append(f"guidance {guidance[index]:g}")
    head = " · ".join(parts)
    extra = []
    if params.get("negative_prompt"):
        extra.append(f"no: {params['negative_prompt']}")
    asked = str(job.get("prompt", ""))
    drawn = results[index].get("revised_prompt") if index < len(results) else None
    # With enhance, what was drawn is the language model's expansion of what was asked.
    prompt = f"✨ {drawn}" if drawn and drawn != asked else asked
    text = "\n".join([head, *extra, prompt])
    return text if len(text) <= CAPTION_LIMIT else text[: CAPTION_LIMIT - 1] + "…"


def friendly_error(err: GenserveError) -> str:
    if err.status == 0:
        return "😕 The image service is unreachable right now. Please try again in a minute."
    if err.status in (401, 403):
        return "🔒 The image service refused the bot's key. Please tell the bot's operator."
    if err.status == 429:
        wait = f" in {math.ceil(err.retry_after_s)} s" if err.retry_after_s else " in a minute"
        return f"🐢 Too many requests right now. Please try again{wait}."
    if err.status == 503:
        return "🚧 The image service is busy. Please try again in a little while."
    if err.status in (400, 404, 409, 413, 422):
        return f"⚠️ That didn't work: {err.message}\nFix it and try again."
    return "😕 Something went wrong on the image service. Please try again later."


def slow_down(wait_s: float) -> str:
    return f"🐢 You're going fast! Please wait {math.ceil(wait_s)} s before the next picture."
