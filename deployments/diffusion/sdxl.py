"""SDXL-family generation: size rules, the modules tiling and batch invariance touch, and one
pipeline call for a group of tasks that share `group_key()`.

Called by `DiffusionEngine` under its lock, inside the hooks of `deployments.diffusion.hooks`.
Each prompt is encoded on its own (batch of one) so embeddings don't depend on the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from deployments.diffusion import img2img, optimize, unet_split
from deployments.diffusion.buckets import snap
from deployments.diffusion.hooks import LiveRows, StopDenoising, take_rows, weighted_sum
from deployments.diffusion.lora_rows import pipeline_rows as lora_rows_kwargs
from deployments.diffusion.types import ImageTask

# The loop's per-row tensors the step callback may replace (diffusers' `_callback_tensor_inputs`).
SHRINKABLE = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")


def size_rules(pipeline: Any) -> tuple[int, int]:
    """(size multiple, minimum size) in pixels for width and height."""
    # The SDXL pipeline checks divisibility by 8; the VAE needs its own scale factor.
    multiple = math.lcm(8, int(pipeline.vae_scale_factor))
    return multiple, 4 * multiple


def tiling_modules(pipeline: Any) -> list[torch.nn.Module]:
    return [pipeline.unet, pipeline.vae]


def heavy_calls(pipeline: Any) -> list[tuple[torch.nn.Module, str]]:
    """The model calls that see the whole batch (what `batch_invariant` splits per task)."""
    return [(pipeline.unet, "forward"), (pipeline.vae, "decode")]


def is_draft(task: ImageTask) -> bool:
    """Draft quality asked for (the request's `quality: "draft"`; part of `group_key()`)."""
    return task.quality == "draft"


def uses_cfg(p: Any, task: ImageTask) -> bool:
    """Classifier-free guidance doubles the batch ([uncond; cond]); LCM-style UNets guide without."""
    return task.guidance_scale > 1 and p.unet.config.time_cond_proj_dim is None


def plan(p: Any, task: ImageTask) -> tuple[int, int, int, int]:
    """(width, height, steps, draft cache interval) this task's group actually runs: its size
    snapped to the configured buckets, and the draft tier's settings for a draft task."""
    speed = optimize.state(p)
    if speed is None:
        return task.width, task.height, task.steps, 0
    width, height = snap(task.width, task.height, speed.buckets)
    draft = speed.options.draft
    if is_draft(task) and draft.enabled:
        return width, height, max(1, math.ceil(task.steps * draft.steps_fraction)), draft.cache_interval
    return width, height, task.steps, 0


def run(
    p: Any,
    tasks: list[ImageTask],
    step_done: Callable[[int], bool],
    generators: list[torch.Generator],
    rows: LiveRows | None = None,
    extra: dict[str, Any] | None = None,
    lora_rows: torch.Tensor | None = None,
) -> list[Image.Image]:
    """Images for the tasks still live at the end (`rows.live`, all of `tasks` without `rows`),
    in that order; raises `StopDenoising` when `step_done(step)` asks to stop.

    With `rows`, a task cancelled mid-loop leaves the batch after the step that noticed it: its
    rows of the latents, embeddings and time ids are dropped, and its generator with them (the
    scheduler draws per-row noise from the remaining ones in order), so the other tasks go on
    exactly as they would have (the seed rule) and the cancelled one costs nothing more.

    Tasks with an init image run the img2img or inpaint pipeline sharing `p`'s components
    (img2img.py); `extra` adds pipeline arguments (the IP-Adapter's image embeddings).
    `lora_rows`: each task's LoRA slot weights [tasks, slots] (placeholder slots: lora_rows.py),
    passed to the UNet as rows and shrunk with the batch."""
    first = tasks[0]
    cfg = uses_cfg(p, first)
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        # One text at a time so embeddings don't depend on the batch they arrive in.
        if text not in cache:
            emb, _, pooled, _ = p.encode_prompt(
                prompt=text, device=p._execution_device, do_classifier_free_guidance=False
            )
            cache[text] = (emb, pooled)
        return cache[text]

    def positive(task: ImageTask) -> tuple[torch.Tensor, ...]:
        if not task.weighted_prompts:
            return encode(task.prompt)
        return weighted_sum([(wp.weight, encode(wp.text)) for wp in task.weighted_prompts])

    pos = [positive(t) for t in tasks]

    def negative(j: int) -> tuple[torch.Tensor, ...]:
        if not tasks[j].negative_prompt and p.config.force_zeros_for_empty_prompt:
            # SDXL's own rule: an absent negative prompt means zero embeddings, not "".
            return tuple(torch.zeros_like(t) for t in pos[j])
        return encode(tasks[j].negative_prompt)

    kwargs: dict[str, Any] = {
        "prompt_embeds": torch.cat([e for e, _ in pos]),
        "pooled_prompt_embeds": torch.cat([pl for _, pl in pos]),
    }
    if cfg:
        neg = [negative(j) for j in range(len(tasks))]
        kwargs["negative_prompt_embeds"] = torch.cat([e for e, _ in neg])
        kwargs["negative_pooled_prompt_embeds"] = torch.cat([pl for _, pl in neg])

    if lora_rows is not None:
        kwargs["cross_attention_kwargs"] = lora_rows_kwargs(lora_rows, cfg, kwargs["prompt_embeds"])

    # An LCM-style `timestep_cond` has batch rows the callback can't replace: keep the rows then
    # (and for inpainting: see img2img.can_drop_rows).
    shrinkable = rows is not None and p.unet.config.time_cond_proj_dim is None and img2img.can_drop_rows(first)

    def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        unet_split.begin_step(pipe.unet, i + 1)  # the draft tier counts steps, not UNet calls
        if step_done(i + 1):
            # diffusers' own stop flag: the loop skips the remaining steps and the pipeline
            # still runs its clean-up (offload hooks); the decoded images are discarded.
            pipe._interrupt = True
            raise_after[0] = True
        elif shrinkable:
            assert rows is not None  # shrinkable implies it
            n = len(rows)
            keep = rows.leaving()
            if keep is not None:
                unet_split.invalidate(pipe.unet)
                # The pipeline's step kwargs hold this same list: shrink it in place.
                generators[:] = [generators[k] for k in keep]
                if lora_rows is not None:  # the pipeline passes this same dict to every UNet call
                    attn = kwargs["cross_attention_kwargs"]
                    attn.update({k: take_rows(v, keep, n) for k, v in attn.items()})
                return {k: take_rows(v, keep, n) for k, v in tensors.items()}
        return tensors

    raise_after = [False]
    width, height, steps, cache_interval = plan(p, first)
    pipe = img2img.pipeline_for(p, first)
    with unet_split.draft(p.unet, cache_interval):
        images = pipe(
            **kwargs,
            **img2img.call_kwargs(tasks, width, height),
            **(extra or {}),
            num_inference_steps=steps,
            guidance_scale=first.guidance_scale,
            generator=generators,
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=list(SHRINKABLE) if shrinkable else ["latents"],
            output_type="pil",
        ).images
    if raise_after[0]:
        raise StopDenoising()
    if (width, height) != (first.width, first.height):  # generated at its bucket: back to the size asked
        images = [im.resize((first.width, first.height), Image.Resampling.LANCZOS) for im in images]
    return list(images)
