"""Würstchen generation: the size rule (which sizes survive the prior/decoder/VQGAN rounding),
the modules tiling and batch invariance touch, and one combined-pipeline call for a group.

`task.steps` are the prior's steps and `guidance_scale` the prior's guidance; the decoder runs
`decoder_steps` steps without guidance. Progress counts prior steps then decoder steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from deployments.diffusion.hooks import StopDenoising, weighted_sum
from deployments.diffusion.types import ImageTask


def size_rules(pipeline: Any, name: str) -> tuple[int, int]:
    """(size multiple, minimum size) in pixels for width and height."""
    # The prior's grid is `resolution_multiple` (42.67) px, the decoder scales it by
    # `latent_dim_scale` (10.67) and the VQGAN by 4, with ceil/int rounding between them: only
    # some sizes come out as asked (others change size or break pixel_unshuffle). Find the
    # smallest step for which 1x..4x all round-trip; 128 px for the released configs.
    for multiple in range(8, 4097, 8):
        if all(out_px(pipeline, k * multiple) == k * multiple for k in (1, 2, 3, 4)):
            return multiple, multiple
    raise ValueError(f"no image size round-trips through the Würstchen pipeline {name!r}")


def out_px(pipeline: Any, px: int) -> int:
    """The size the pipeline produces when asked for `px` (-1: it would fail)."""
    prior_cfg = pipeline.prior_pipe.config
    decoder_cfg = pipeline.decoder_pipe.config
    vq_cfg = pipeline.vqgan.config
    vq_scale = vq_cfg.up_down_scale_factor * 2 ** (vq_cfg.levels - 1)
    prior_px = math.ceil(px / prior_cfg.resolution_multiple)
    decoder_px = int(prior_px * decoder_cfg.latent_dim_scale)
    if decoder_px % 2:  # DiffNeXt pixel-unshuffles by 2
        return -1
    return decoder_px * vq_scale


def tiling_modules(pipeline: Any) -> list[torch.nn.Module]:
    return [pipeline.prior_prior, pipeline.decoder, pipeline.vqgan]


def heavy_calls(pipeline: Any) -> list[tuple[torch.nn.Module, str]]:
    """The model calls that see the whole batch (what `batch_invariant` splits per task)."""
    return [(pipeline.prior_prior, "forward"), (pipeline.decoder, "forward"), (pipeline.vqgan, "decode")]


def run(
    p: Any,
    tasks: list[ImageTask],
    step_done: Callable[[int], bool],
    generators: list[torch.Generator],
    *,
    decoder_steps: int,
) -> list[Image.Image]:
    """Images for `tasks` in order; raises `StopDenoising` when `step_done(step)` asks to stop."""
    prior, decoder = p.prior_pipe, p.decoder_pipe
    device = p._execution_device
    first = tasks[0]
    cfg = first.guidance_scale > 1
    prior_cache: dict[str, tuple[torch.Tensor]] = {}

    def prior_encode(text: str) -> tuple[torch.Tensor]:
        if text not in prior_cache:
            emb, _ = prior.encode_prompt(device, 1, False, prompt=[text])
            prior_cache[text] = (emb,)
        return prior_cache[text]

    def prior_positive(task: ImageTask) -> torch.Tensor:
        if not task.weighted_prompts:
            return prior_encode(task.prompt)[0]
        return weighted_sum([(wp.weight, prior_encode(wp.text)) for wp in task.weighted_prompts])[0]

    def decoder_text(task: ImageTask) -> str:
        if not task.weighted_prompts:
            return task.prompt
        return ", ".join(wp.text for wp in task.weighted_prompts if wp.weight > 0)

    # diffusers 0.42's decoder repeats each of a list of B prompts B times (B*B rows against B
    # latents: "Sizes of tensors must match"), so a batch of different prompts fails. Encode
    # each decoder prompt on its own here and hand the rows to the decoder below.
    decoder_rows = torch.cat(
        [decoder.encode_prompt([decoder_text(t)], device, 1, False)[0] for t in tasks]
    )

    kwargs: dict[str, Any] = {"prompt_embeds": torch.cat([prior_positive(t) for t in tasks])}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.cat(
            [prior_encode(t.negative_prompt)[0] for t in tasks]
        )

    def prior_step(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if step_done(i + 1):
            raise StopDenoising()  # these pipelines have no `_interrupt` flag
        return tensors

    def decoder_step(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if step_done(first.steps + i + 1):
            raise StopDenoising()
        return tensors

    def decoder_encode(*args: Any, **kw: Any) -> tuple[torch.Tensor, None]:
        return decoder_rows, None  # decoder guidance is 0: no unconditional rows needed

    decoder.encode_prompt = decoder_encode  # instance attribute shadows the method
    try:
        images = p(
            prompt=[decoder_text(t) for t in tasks],
            **kwargs,
            height=first.height,
            width=first.width,
            prior_num_inference_steps=first.steps,
            prior_guidance_scale=first.guidance_scale,
            num_inference_steps=decoder_steps,
            decoder_guidance_scale=0.0,
            generator=generators,
            prior_callback_on_step_end=prior_step,
            callback_on_step_end=decoder_step,
            output_type="pil",
        ).images
    finally:
        del decoder.encode_prompt
    return list(images)
