"""The vocabulary between the ingress and a diffusion replica.

One `ImageTask` is one image: the ingress fans `n` images out into `n` tasks, so Serve's
batching groups images from many users (and from one user's `n`) into one denoising batch.
Plain dataclasses: they cross process boundaries through Ray's serializer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class WeightedPrompt:
    """One part of a multi-prompt (`a::2 b::-0.5`); weights are used as given (see engine)."""

    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class InputImage:
    """An image a task starts from or refers to, already fetched, checked and re-encoded by the
    ingress (serve_app/images): replicas never fetch URLs. `sha256` is of `png`: the cache key
    for anything derived from it (IP-Adapter embeddings) and what `group_key()` compares."""

    png: bytes = field(repr=False)
    sha256: str


@dataclass(frozen=True)
class Reference:
    """A style (`--sref`/`--sw`) or character/omni (`--cref`, `--oref`/`--ow`) reference, drawn
    through IP-Adapter at `scale` (0 = as if absent)."""

    kind: Literal["style", "character"]
    image: InputImage
    scale: float


@dataclass(frozen=True)
class LoraUse:
    """One adapter applied to a task: the registry's id (unique, content-addressed by sha256) and
    its weight. The adapter set of a task is its Serve multiplexed model id (issue 21)."""

    adapter_id: str
    weight: float = 1.0


@dataclass(frozen=True)
class ImageTask:
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    tile: bool = False
    # Multi-prompt weights. Empty means "encode `prompt` as one piece".
    weighted_prompts: tuple[WeightedPrompt, ...] = ()
    # Correlates progress callbacks and cancellation with a job (None for plain requests).
    task_id: str | None = None
    # W3C `traceparent` + request id/tenant of the caller (telemetry.tracing.outgoing);
    # not part of equality or hashing: it says who asked, not what to draw.
    trace_context: dict[str, str] | None = field(default=None, compare=False, hash=False)
    # The tenant plan's priority: the replica's batch queue serves higher first (with aging).
    priority: int = 0
    # The replica may lower `steps` under load (adaptive quality); False for an explicit --q/steps.
    quality_auto: bool = False
    # Write prompt, negative prompt, seed and settings into the PNG as text chunks. Off by default:
    # anyone holding a result URL could read the prompt (the plan/request `metadata` option).
    embed_metadata: bool = False
    # Images from images (issue 20): img2img from `init_image` at `strength` (0 < s <= 1; from
    # `--iw`), inpainting when a `mask` is given too (white = repaint), IP-Adapter `references`.
    init_image: InputImage | None = None
    mask: InputImage | None = None
    strength: float = 1.0
    references: tuple[Reference, ...] = ()
    # LoRA adapters (issue 21), in the order given.
    loras: tuple[LoraUse, ...] = ()
    # "draft": the engine's draft tier (optimize.draft: fewer steps + DeepCache), issue 23.
    quality: Literal["default", "draft"] = "default"
    # Streamed partial images: previews of this image decoded at evenly spaced steps (0-3; needs the
    # model's preview decoder, deployments/diffusion/previews.py). Not in `group_key()`: previews
    # read the batch's latents and change nothing in it.
    partial_images: int = 0

    @property
    def megapixels(self) -> float:
        """What this image costs the replica's batch memory budget."""
        return self.width * self.height / 1e6

    def group_key(self, *, with_loras: bool = True) -> tuple[Any, ...]:
        """Tasks with equal keys can share one denoising call. `with_loras=False`: a model whose
        LoRA slots weigh each row on its own (lora_rows.py) mixes adapter sets in one call."""
        return (self.width, self.height, self.steps, float(self.guidance_scale), self.tile, self.quality,
                # img2img/inpainting run another pipeline; strength sets the steps that run.
                self.init_image is not None, self.mask is not None, float(self.strength) if self.init_image else 1.0,
                # One IP-Adapter image set and one adapter set per pipeline call.
                tuple((r.kind, r.image.sha256, float(r.scale)) for r in self.references),
                tuple((lora.adapter_id, float(lora.weight)) for lora in self.loras) if with_loras else ())


@dataclass
class ImageResult:
    """A generated image as PNG bytes (parameters embedded as PNG text if the task asked) plus what was used."""

    png: bytes
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    model: str
    batch_size: int
    # Seconds this image's batch spent denoising+decoding, and waiting in the replica's queue.
    compute_s: float = 0.0
    queue_wait_s: float = 0.0
    # The share of one GPU the replica holds (Ray's num_gpus; 1.0 on CPU): GPU-seconds = compute_s /
    # batch_size × gpu_share, so two half-GPU replicas sharing a card don't bill it twice.
    gpu_share: float = 1.0
    # Adaptive quality: `steps` above is what ran; `requested_steps` what the task asked for.
    degraded: bool = False
    degrade_reason: str | None = None
    requested_steps: int | None = None
    # "draft" when the image ran on the draft tier (asked for, or adaptive quality's fallback).
    quality: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PartialImage:
    """A preview of a task's image during denoising (the `partial_images` it asked for), as a small
    PNG; yielded by `generate_stream` between its step events."""

    index: int  # 0-based, in order
    step: int  # the denoising step it shows
    total: int  # the steps the loop runs
    png: bytes = field(repr=False)
    width: int = 0
    height: int = 0
