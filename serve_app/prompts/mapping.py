"""From typed prompt parameters to diffusion parameters.

The table below is the same as the one in docs/prompt-parameters.md (a test keeps them equal);
the doc is the source for users. `g` is the base guidance and `steps` the base step count: the
request's JSON value when given, else the model's default.

| Prompt | Field | Diffusion parameter | Rule |
|---|---|---|---|
| `--ar W:H`, `--aspect W:H` | `aspect_ratio` | `width`, `height` | `size_for_aspect`: keep the model's native pixel count (native_side²), width/height ≈ W/H, each side rounded to the nearest multiple of `multiple` (64 for real models, 8 for tiny ones), never below `multiple`; if a side exceeds `max_side`, both sides shrink by the same factor |
| `--s N`, `--stylize N` | `stylize` | `guidance_scale` | `guidance_for_stylize`: piecewise linear through (0 → min(1, g)), (100 → g), (1000 → 2.5·g); 100 is the default, so `--s 100` changes nothing |
| `--q Q`, `--quality Q` | `quality` | `num_inference_steps` | `steps_for_quality`: max(1, round_half_up(steps · Q)) |
| `--c N`, `--chaos N` | `chaos` | `guidance_scale` of each image | `chaos_guidance`: image i gets max(1, g · (1 + N/100 · u_i)), u_i ∈ [-0.5, 0.5) from `random.Random(seed · 1000003 + i)`; unchanged when N = 0 or g ≤ 1 (no CFG to vary) |
| `--seed N` | `seed` | `torch.Generator` seed | `seed_for_image`: image i of the request uses (N + i) mod 2³² |
| `--no a, b` | `negative` | `negative_prompt` | `negative_prompt`: the request's `negative_prompt`, then the terms, joined with ", " |
| `--tile` | `tile` | `tile` (circular padding) | passed through |
| `--v X`, `--version X`, `--model NAME` | `model` | which diffusion deployment | "vX" or NAME, resolved by the router against the configured models and aliases |
| `--enhance` | `enhance` | prompt expansion by the LLM | passed through |
| image URLs / `file-...` ids first, `--iw W` | `image_prompts`, `image_weight` | `init_image`, `strength` (img2img) | `strength_for_image_weight`: strength = clamp(1 − W/3, 0.05, 1); W defaults to 1 (strength ≈ 0.667), `--iw 0` → 1 (the image only seeds the noise), `--iw 3` → 0.05 |
| `--sref URL...`, `--sw N` | `style_refs`, `style_weight` | IP-Adapter reference, kind `style` | `reference_scale`: piecewise linear through (0 → 0), (100 → 0.6), (1000 → 1.2); N defaults to 100 |
| `--cref URL...`, `--cw N` | `character_refs`, `character_weight` | IP-Adapter reference, kind `character` | `character_scale`: 0.3 + 0.3·N/100 (N 0–100, default 100 → 0.6); `--cw 0` still keeps the face |
| `--oref URL`, `--ow N` | `omni_ref`, `omni_weight` | IP-Adapter reference, kind `character` | `reference_scale` as for `--sw` (N 1–1000, default 100 → 0.6) |
| `a::2 b::-0.5` | `segments` | prompt embeddings | each part encoded separately, combined as sum(w_i·e_i) / sum(w_i) |
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from deployments.diffusion import rules
from deployments.diffusion.rules import seed_for_image
from serve_app.prompts.params import PromptParams

STYLIZE_DEFAULT = 100
STYLIZE_MAX = 1000
STYLIZE_MAX_FACTOR = 2.5  # guidance at --s 1000, relative to the base guidance


def size_for_aspect(
    ar: tuple[int, int], native_pixels: int, multiple: int, max_side: int | None = None
) -> tuple[int, int]:
    """(width, height): about `native_pixels` pixels, width/height ≈ ar, sides % multiple == 0."""
    w_ratio, h_ratio = ar
    rules.check_aspect_ratio(w_ratio, h_ratio, name="ar")
    if native_pixels < 1:
        raise ValueError(f"native_pixels must be positive, got {native_pixels}")
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    if max_side is not None and max_side < multiple:
        raise ValueError(f"max_side must be at least multiple ({multiple}), got {max_side}")
    ratio = w_ratio / h_ratio
    width = math.sqrt(native_pixels * ratio)
    height = math.sqrt(native_pixels / ratio)
    if max_side is not None and max(width, height) > max_side:
        shrink = max_side / max(width, height)
        width, height = width * shrink, height * shrink
    return _snap(width, multiple, max_side), _snap(height, multiple, max_side)


def _snap(side: float, multiple: int, max_side: int | None) -> int:
    snapped = max(multiple, math.floor(side / multiple + 0.5) * multiple)
    if max_side is not None and snapped > max_side:
        snapped = max(multiple, (max_side // multiple) * multiple)
    return snapped


def guidance_for_stylize(s: int, default_guidance: float) -> float:
    """Piecewise linear: 0 → min(1, g), 100 → g, 1000 → 2.5·g (g = default_guidance)."""
    if not 0 <= s <= STYLIZE_MAX:
        raise ValueError(f"s must be between 0 and {STYLIZE_MAX}, got {s}")
    if not math.isfinite(default_guidance) or default_guidance < 0:
        raise ValueError(f"default_guidance must be a finite number >= 0, got {default_guidance}")
    g = default_guidance
    # min(): a CFG-free model (guidance 0, e.g. turbo) stays CFG-free and the curve stays
    # non-decreasing instead of dropping from 1.0 to g.
    low = min(1.0, g)
    if s <= STYLIZE_DEFAULT:
        return low + (g - low) * s / STYLIZE_DEFAULT
    span = STYLIZE_MAX - STYLIZE_DEFAULT
    return g + (STYLIZE_MAX_FACTOR * g - g) * (s - STYLIZE_DEFAULT) / span


def steps_for_quality(q: float, default_steps: int) -> int:
    """round_half_up(default_steps × q), at least 1."""
    if not q > 0 or not math.isfinite(q):
        raise ValueError(f"q must be a positive number, got {q}")
    if default_steps < 1:
        raise ValueError(f"default_steps must be at least 1, got {default_steps}")
    return max(1, math.floor(default_steps * q + 0.5))


def chaos_guidance(chaos: int, guidance: float, seed: int, index: int) -> float:
    """Guidance of image `index`: deterministic in (seed, index); ≥ 1 unless guidance ≤ 1."""
    if not 0 <= chaos <= 100:
        raise ValueError(f"chaos must be between 0 and 100, got {chaos}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if chaos == 0 or guidance <= 1.0:
        return guidance
    u = random.Random(seed * 1_000_003 + index).random() - 0.5
    return max(1.0, guidance * (1.0 + chaos / 100 * u))


IMAGE_WEIGHT_DEFAULT = 1.0
STRENGTH_MIN = 0.05  # at least one denoising step must run on the image
REFERENCE_WEIGHT_DEFAULT = 100
REFERENCE_SCALE_DEFAULT = 0.6  # IP-Adapter scale at a default weight (`--sw 100`, `--ow 100`, `--cw 100`)
REFERENCE_SCALE_MAX = 1.2  # at `--sw 1000` / `--ow 1000`: beyond this IP-Adapter copies the reference


def strength_for_image_weight(iw: float | None) -> float:
    """img2img strength from `--iw` (None: Midjourney's default 1): 1 − iw/3 within [0.05, 1]."""
    w = IMAGE_WEIGHT_DEFAULT if iw is None else iw
    if not (math.isfinite(w) and 0.0 <= w <= 3.0):
        raise ValueError(f"iw must be between 0 and 3, got {w}")
    return round(min(1.0, max(STRENGTH_MIN, 1.0 - w / 3.0)), 4)


def reference_scale(weight: int | None) -> float:
    """IP-Adapter scale of `--sref`/`--oref` from `--sw`/`--ow` (0–1000, None: 100)."""
    w = REFERENCE_WEIGHT_DEFAULT if weight is None else weight
    if not 0 <= w <= 1000:
        raise ValueError(f"reference weight must be between 0 and 1000, got {w}")
    if w <= REFERENCE_WEIGHT_DEFAULT:
        return round(REFERENCE_SCALE_DEFAULT * w / REFERENCE_WEIGHT_DEFAULT, 4)
    span = 1000 - REFERENCE_WEIGHT_DEFAULT
    return round(REFERENCE_SCALE_DEFAULT + (REFERENCE_SCALE_MAX - REFERENCE_SCALE_DEFAULT)
                 * (w - REFERENCE_WEIGHT_DEFAULT) / span, 4)


def character_scale(cw: int | None) -> float:
    """IP-Adapter scale of `--cref` from `--cw` (0–100, None: 100): 0.3 + 0.3·cw/100."""
    w = 100 if cw is None else cw
    if not 0 <= w <= 100:
        raise ValueError(f"cw must be between 0 and 100, got {w}")
    return round(0.3 + 0.3 * w / 100, 4)


def negative_prompt(params: PromptParams, base: str | None) -> str:
    """The request's own negative prompt followed by the `--no` terms, joined with ", "."""
    parts = [base.strip()] if base and base.strip() else []
    parts.extend(params.negative)
    return ", ".join(parts)


@dataclass(frozen=True)
class ModelDefaults:
    """What a model uses when neither the JSON request nor the prompt says otherwise."""

    native_side: int  # 1024 for SDXL; the side of the square native resolution
    multiple: int  # 64 for real models, 8 for tiny ones
    steps: int
    guidance: float
    max_side: int | None = None


class ImageSettings(BaseModel):
    """Resolved diffusion parameters of a request's images: shared ones once, per image the seed and
    guidance (`--c` varies it). `images.spec.ImageSpec` extends it with what and where to draw."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int
    height: int
    steps: int
    negative_prompt: str
    tile: bool
    seeds: tuple[int, ...]
    guidance_scales: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.seeds)


def resolve_images(
    params: PromptParams,
    defaults: ModelDefaults,
    *,
    n: int,
    seed: int,
    size: tuple[int, int] | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    negative: str | None = None,
) -> ImageSettings:
    """Apply the precedence rule (docs/prompt-parameters.md) to the JSON fields and prompt flags.

    JSON fields set the base; prompt flags are applied on top: absolute flags (--seed, --ar)
    replace the JSON value, relative flags (--s, --q, --c) transform the base, --no appends.
    `seed` is the request's seed (its JSON `seed`, or one the caller drew at random).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    base_seed = params.seed if params.seed is not None else seed
    if params.aspect_ratio is not None:
        width, height = size_for_aspect(
            params.aspect_ratio, defaults.native_side**2, defaults.multiple, defaults.max_side
        )
    elif size is not None:
        width, height = size
    else:
        width = height = defaults.native_side
    base_steps = steps if steps is not None else defaults.steps
    if params.quality is not None:
        base_steps = steps_for_quality(params.quality, base_steps)
    guidance = guidance_scale if guidance_scale is not None else defaults.guidance
    if params.stylize is not None:
        guidance = guidance_for_stylize(params.stylize, guidance)
    neg = negative_prompt(params, negative)
    return ImageSettings(
        width=width, height=height, steps=base_steps, negative_prompt=neg, tile=params.tile,
        seeds=tuple(seed_for_image(base_seed, i) for i in range(n)),
        # Rounded: the value is shown, stored and compared (batch grouping) as written.
        guidance_scales=tuple(round(chaos_guidance(params.chaos or 0, guidance, base_seed, i), 4) for i in range(n)),
    )
