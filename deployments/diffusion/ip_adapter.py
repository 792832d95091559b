"""Style and character references (`task.references`) through IP-Adapter, SDXL family.

Design:
- Two adapters, loaded once at start from the same weights (`load_ip_adapter` with a list of two):
  adapter 0 draws the task's style references, adapter 1 its character references, each at its
  own scale (`set_ip_adapter_scale([style, character])`), so `--sref ... --sw` and `--cref ...
  --ow` act independently in one task. The style adapter can be limited to some UNet blocks
  (`IPAdapterConfig.style_blocks`, InstantStyle's `{"up": {"block_0": [0, 1, 0]}}` on SDXL) so
  a style reference carries its look, not its layout; None: every block, like a character one.
- Several references of one kind are several images of that adapter (their tokens are
  concatenated, diffusers' multi-image form); the kind's scale is the largest of their scales.
  A reference at scale 0 is removed before grouping (`without_zero_scales`): the task then runs
  exactly as one with no reference. A kind without images runs its adapter at scale 0, which
  diffusers' processor skips.
- Image embeddings are computed once per reference image (the pipeline's `encode_image`, CLIP
  vision encoder) and kept in a bounded LRU keyed by the image's sha256, verified against its bytes.
- Tasks without references must give exactly the pixels of an engine that never loaded the
  adapter: between reference groups the UNet gets its own attention processors back and no
  image projection (`_disable`), the state `unload_ip_adapter` would leave, without reloading
  weights for the next reference group (`active`).
- A cancelled task's rows leave the batch mid-loop (sdxl.run); the image embeddings are not among
  the tensors diffusers lets the step callback shrink, so a UNet pre-hook trims them to the rows
  that remain (every row of a group holds the same embeddings: references are in `group_key()`).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from deployments.diffusion.config import IPAdapterConfig
from deployments.diffusion.types import ImageTask, InputImage

KINDS = ("style", "character")  # adapter order


def without_zero_scales(task: ImageTask) -> ImageTask:
    """`task` minus references at scale 0 (they draw nothing: the same task without them)."""
    if all(r.scale != 0 for r in task.references):
        return task
    return replace(task, references=tuple(r for r in task.references if r.scale != 0))


def check(task: ImageTask, *, loaded: bool, model: str | None = None) -> None:
    """Raise ValueError naming the parameter when `task`'s references can't run here."""
    if not task.references:
        return
    of = f" for model {model!r}" if model else ""
    if not loaded:
        raise ValueError(f"`references` (style/character references: --sref, --cref, --oref) need an IP-Adapter, "
                         f"and none is configured{of}.")
    for i, ref in enumerate(task.references):
        if ref.kind not in KINDS:
            raise ValueError(f"`references[{i}].kind` has to be one of {KINDS} but is {ref.kind!r}.")
        if not (isinstance(ref.scale, (int, float)) and math.isfinite(ref.scale) and ref.scale >= 0):
            raise ValueError(f"`references[{i}].scale` has to be a finite number >= 0 but is {ref.scale!r}.")
        if hashlib.sha256(ref.image.png).hexdigest() != ref.image.sha256:
            raise ValueError(f"`references[{i}].image.sha256` does not match the image bytes.")


def _scaled(blocks: Any, scale: float) -> Any:
    """InstantStyle's per-block scale map with every entry multiplied by `scale`."""
    if isinstance(blocks, dict):
        return {k: _scaled(v, scale) for k, v in blocks.items()}
    if isinstance(blocks, list):
        return [_scaled(v, scale) for v in blocks]
    return float(blocks) * scale


class ReferenceAdapter:
    """The IP-Adapter of one loaded SDXL pipeline; off (plain UNet) except inside `active`."""

    def __init__(self, pipeline: Any, config: IPAdapterConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        unet = pipeline.unet
        plain_procs = dict(unet.attn_processors)
        pipeline.load_ip_adapter([config.repo] * len(KINDS), subfolder=[config.subfolder] * len(KINDS),
                                 weight_name=[config.weight_name] * len(KINDS),
                                 image_encoder_folder=config.image_encoder)
        self._ip_procs = dict(unet.attn_processors)
        self._projection = unet.encoder_hid_proj
        self._hid_type = unet.config.encoder_hid_dim_type
        # The plain projection gets CLIP's pooled image embedding; "plus" ones the hidden states.
        from diffusers.models.embeddings import ImageProjection

        self._hidden_states = not isinstance(self._projection.image_projection_layers[0], ImageProjection)
        self._plain_procs = plain_procs
        self._embeddings: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._zero: torch.Tensor | None = None
        self.cache_hits = 0
        self.cache_misses = 0
        try:  # a style_blocks map that doesn't fit this UNet fails the load, not a request
            pipeline.set_ip_adapter_scale(self._scales(1.0, 1.0))
        finally:
            self._disable()
        pipeline.set_progress_bar_config(disable=True)

    # -- on/off -------------------------------------------------------------------------------

    def _disable(self) -> None:
        unet = self.pipeline.unet
        unet.set_attn_processor(dict(self._plain_procs))  # the dict is consumed: pass a copy
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = None

    def _enable(self) -> None:
        unet = self.pipeline.unet
        unet.set_attn_processor(dict(self._ip_procs))
        unet.encoder_hid_proj = self._projection
        unet.config.encoder_hid_dim_type = self._hid_type

    def _scales(self, style: float, character: float) -> list[Any]:
        blocks = self.config.style_blocks
        return [_scaled(blocks, style) if blocks else style, character]

    # -- embeddings ---------------------------------------------------------------------------

    def embedding(self, image: InputImage) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, unconditional) embeddings of one reference image, [1, ...] each; cached."""
        hit = self._embeddings.get(image.sha256)
        if hit is not None:
            self._embeddings.move_to_end(image.sha256)
            self.cache_hits += 1
            return hit
        self.cache_misses += 1
        with Image.open(io.BytesIO(image.png)) as im:
            rgb = im.convert("RGB")
        p = self.pipeline
        pos, neg = p.encode_image(rgb, p._execution_device, 1, self._hidden_states)
        self._embeddings[image.sha256] = (pos, neg)
        while len(self._embeddings) > self.config.embedding_cache:
            self._embeddings.popitem(last=False)
        return pos, neg

    def _kind_embeds(self, task: ImageTask, kind: str, rows: int, cfg: bool) -> tuple[torch.Tensor, float]:
        """One adapter's `ip_adapter_image_embeds` entry for a group of `rows` tasks, and its scale."""
        refs = [r for r in task.references if r.kind == kind]
        if refs:
            pairs = [self.embedding(r.image) for r in refs]
            pos = torch.cat([p for p, _ in pairs])[None]  # [1, images, ...]
            neg = torch.cat([n for _, n in pairs])[None]
            scale = max(r.scale for r in refs)
        else:  # this adapter draws nothing (scale 0 is skipped); it still needs an input
            pos = neg = self._zero_embedding()
            scale = 0.0
        pos = pos.expand(rows, *pos.shape[1:])
        neg = neg.expand(rows, *neg.shape[1:])
        return (torch.cat([neg, pos]) if cfg else pos.contiguous()), scale

    def _zero_embedding(self) -> torch.Tensor:
        """Zeros shaped like one image's embedding, [1, 1, ...] (the input of an unused adapter)."""
        if self._zero is None:
            size = int(self.pipeline.image_encoder.config.image_size)
            p = self.pipeline
            pos, _ = p.encode_image(Image.new("RGB", (size, size)), p._execution_device, 1, self._hidden_states)
            self._zero = torch.zeros_like(pos)[None]
        return self._zero

    # -- one pipeline call ----------------------------------------------------------------------

    @contextmanager
    def active(self, tasks: list[ImageTask], cfg: bool) -> Iterator[dict[str, Any]]:
        """The pipeline-call kwargs that draw the group's references, with the adapter switched on
        for the call (and off again after). A group without references gets `{}` and a plain UNet."""
        first = tasks[0]
        if not first.references:
            yield {}
            return
        embeds, scales = [], []
        for kind in KINDS:
            e, s = self._kind_embeds(first, kind, len(tasks), cfg)
            embeds.append(e)
            scales.append(s)
        self._enable()
        p = self.pipeline
        hook = p.unet.register_forward_pre_hook(_trim_rows(cfg), with_kwargs=True)
        try:
            p.set_ip_adapter_scale(self._scales(*scales))
            yield {"ip_adapter_image_embeds": embeds}
        finally:
            hook.remove()
            self._disable()


def _trim_rows(cfg: bool) -> Any:
    """A UNet forward pre-hook: the image embeddings cut to the batch's current rows (rows leave
    when a task is cancelled; all rows of one half hold the same values)."""

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        sample = args[0] if args else kwargs["sample"]
        added = kwargs.get("added_cond_kwargs") or {}
        embeds = added.get("image_embeds")
        n = int(sample.shape[0])
        if not embeds or embeds[0].shape[0] == n:
            return None

        def cut(e: torch.Tensor) -> torch.Tensor:
            if not cfg:
                return e[:n]
            half, m = e.shape[0] // 2, n // 2
            return torch.cat([e[:m], e[half:half + m]])

        return args, {**kwargs, "added_cond_kwargs": {**added, "image_embeds": [cut(e) for e in embeds]}}

    return hook
