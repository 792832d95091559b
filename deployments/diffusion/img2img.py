"""Images from images on the SDXL family: img2img (`task.init_image`) and inpainting (`task.mask`
too), with diffusers' own pipelines built on the loaded one.

`from_pipe` gives `StableDiffusionXLImg2ImgPipeline` / `StableDiffusionXLInpaintPipeline` the base
pipeline's component objects (UNet, VAE, text encoders, scheduler config): no second copy of the
weights, and whatever optimize.py did to the UNet (split, compile, channels-last) applies to them
too. They are built lazily, once per loaded pipeline, and kept on it.

Rules (`check`, called by the engine's `validate`):
- `strength` in (0, 1]: the share of the schedule that runs, as in diffusers: the last
  `int(steps * strength)` of `steps` steps (`steps_run`); at least one step must run.
- The init image (and the mask) are resized to the size the task is generated at (its `width` x
  `height`, or its size bucket): the ingress picks the size, e.g. from the image's aspect ratio.
  The mask must have exactly the init image's size (as OpenAI's edits API requires): a mismatched
  mask is refused, not stretched.
- The mask is read as grey levels: white = repaint, black = keep (diffusers' convention; the
  ingress converts OpenAI's "transparent = edit" masks). A mask without an init image is refused.
"""

from __future__ import annotations

import io
import math
from typing import Any

from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
from PIL import Image

from deployments.diffusion.types import ImageTask, InputImage

_KEY = "_genserve_image_pipelines"


def steps_run(steps: int, strength: float) -> int:
    """Denoising steps an img2img/inpaint call runs: diffusers' `get_timesteps` arithmetic."""
    return min(int(steps * strength), steps)


def _size(image: InputImage, name: str) -> tuple[int, int]:
    """Width and height from the PNG header (no pixel decode)."""
    try:
        with Image.open(io.BytesIO(image.png)) as im:
            return im.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ValueError(f"`{name}` is not a readable image: {exc}") from None


def check(task: ImageTask, *, model: str | None = None) -> None:
    """Raise ValueError naming the parameter when `task`'s image inputs can't run."""
    of = f" for model {model!r}" if model else ""
    if task.init_image is None:
        if task.mask is not None:
            raise ValueError(f"`mask` needs an image to edit (init_image){of}.")
        return
    s = task.strength
    if not (isinstance(s, (int, float)) and math.isfinite(s) and 0 < s <= 1):
        raise ValueError(f"`strength` has to be a number in (0, 1] but is {s!r}.")
    if steps_run(task.steps, s) < 1:
        raise ValueError(f"`strength` ({s:g}) x `steps` ({task.steps}) leaves no denoising step to run: "
                         f"raise one of them (at least 1 step must run).")
    size = _size(task.init_image, "init_image")
    if task.mask is not None:
        mask = _size(task.mask, "mask")
        if mask != size:
            raise ValueError(f"`mask` must have the size of the image ({size[0]}x{size[1]}) but is "
                             f"{mask[0]}x{mask[1]}.")


def pipeline_for(base: Any, task: ImageTask) -> Any:
    """The pipeline that runs `task`'s group: `base` for txt2img, else its img2img or inpaint
    sibling sharing `base`'s components (built on first use, then kept on `base`)."""
    if task.init_image is None:
        return base
    kind = "inpaint" if task.mask is not None else "img2img"
    built: dict[str, Any] = base.__dict__.setdefault(_KEY, {})
    if kind not in built:
        cls: Any = StableDiffusionXLInpaintPipeline if kind == "inpaint" else StableDiffusionXLImg2ImgPipeline
        # from_pipe casts the new pipeline to `torch_dtype`, default float32, and the components are
        # shared: without the base's dtype the first img2img call turned the whole fp16 replica
        # (UNet, VAE, text encoders) to float32, ~4x slower for every later request (H100 run).
        pipe = cls.from_pipe(base, torch_dtype=base.dtype)
        pipe.set_progress_bar_config(disable=True)
        built[kind] = pipe
    return built[kind]


def can_drop_rows(task: ImageTask) -> bool:
    """Whether a cancelled task's rows can leave the batch mid-loop. Inpainting keeps per-row state
    the step callback can't replace (the init latents and noise it re-blends every step), so an
    inpaint group keeps computing a cancelled row to the end (the others are unaffected)."""
    return task.mask is None


def _load(image: InputImage, width: int, height: int, mode: str) -> Image.Image:
    with Image.open(io.BytesIO(image.png)) as f:
        im = f.convert(mode)
    if im.size != (width, height):
        im = im.resize((width, height), Image.Resampling.LANCZOS)
    return im


def call_kwargs(tasks: list[ImageTask], width: int, height: int) -> dict[str, Any]:
    """The size and image arguments of the group's pipeline call (one init image, one mask per
    task, in row order), at the size the group is generated at. img2img takes its size from the
    image (its pipeline has no `width`/`height`)."""
    first = tasks[0]
    if first.init_image is None:
        return {"width": width, "height": height}
    kwargs: dict[str, Any] = {
        "image": [_load(t.init_image, width, height, "RGB") for t in tasks if t.init_image is not None],
        "strength": first.strength,  # part of group_key(): equal for the group
    }
    if first.mask is not None:
        kwargs["width"], kwargs["height"] = width, height
        kwargs["mask_image"] = [_load(t.mask, width, height, "L") for t in tasks if t.mask is not None]
    return kwargs
