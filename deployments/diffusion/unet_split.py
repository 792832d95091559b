"""The SDXL UNet's forward as three pieces, so each can be compiled (and CUDA-graphed) on its own and
the draft tier can skip the middle one (DeepCache, Ma et al. 2023).

    shallow_in:  time/text embeddings, conv_in, down_blocks[0]          (full resolution, cheap)
    deep:        down_blocks[1:], mid_block, up_blocks[:-1]             (~90 % of the FLOPs at 1024²)
    shallow_out: up_blocks[-1], norm, conv_out                          (full resolution, cheap)

Default quality runs all three every step: the same modules in the same order as
`UNet2DConditionModel.forward`, so the result equals the unsplit model's (tests check it on CPU).

Draft (`draft(interval=N)`): every N-th call (the first included) runs in full and keeps `deep`'s
output; the calls between reuse it and run only the two shallow pieces. Adjacent denoising steps
change the deep features little, which is DeepCache's observation. diffusers' own caches
(`diffusers.hooks` FirstBlockCache / FasterCache) look for DiT `transformer_blocks` at the model's
top level and don't apply to `UNet2DConditionModel`, hence this module.

Calls the split can't serve (attention masks, ControlNet/adapter residuals, sizes that need
`upsample_size`, class labels) go to the original forward unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

_KEY = "_genserve_split"


def supports(unet: Any) -> bool:
    """The shallow pieces need the last up block to consume exactly conv_in's output and the
    resnet outputs of the first down block (standard layers_per_block + 1 layout)."""
    try:
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
    except (AttributeError, IndexError):
        return False
    return len(last.resnets) == len(first.resnets) + 1 and unet.config.class_embed_type is None and \
        unet.config.addition_embed_type in (None, "text", "text_time")


def _cross(block: Any) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


class SplitUNet:
    """Installed on a `UNet2DConditionModel` as its `forward` (see `install`)."""

    def __init__(self, unet: Any, compile_fn: Callable[[Callable], Callable] | None = None) -> None:
        self.unet = unet
        self.original_forward = unet.forward
        self.k = len(unet.up_blocks[-1].resnets)  # res samples the last up block takes
        wrap = compile_fn or (lambda f: f)
        self.shallow_in = wrap(self._shallow_in)
        self.deep = wrap(self._deep)
        self.shallow_out = wrap(self._shallow_out)
        self.cudagraphs = False  # set by optimize.apply for modes that capture CUDA graphs
        self.draft_interval = 0  # 0: full every step
        self.step = 0  # denoising step of the running call (`begin_step`)
        self.slot = 0  # UNet calls so far in this step (per-task calls under batch invariance)
        self.cached: dict[int, torch.Tensor] = {}  # slot -> deep features of the last full step
        self.counts = {"full": 0, "reused": 0}

    # -- the pieces (pure functions of their tensors; what torch.compile sees) -----------------

    def _shallow_in(self, sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs):
        u = self.unet
        if u.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        aug = u.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug if aug is not None else emb
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        ehs = u.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                              added_cond_kwargs=added_cond_kwargs)
        sample = u.conv_in(sample)
        block = u.down_blocks[0]
        if _cross(block):
            h, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs)
        else:
            h, res = block(hidden_states=sample, temb=emb)
        return (emb, ehs, h, sample, *res)

    def _deep(self, h, emb, ehs, *res):
        u = self.unet
        res = tuple(res)
        for block in u.down_blocks[1:]:
            if _cross(block):
                h, more = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
            else:
                h, more = block(hidden_states=h, temb=emb)
            res += more
        if u.mid_block is not None:
            h = u.mid_block(h, emb, encoder_hidden_states=ehs) if _cross(u.mid_block) else u.mid_block(h, emb)
        for block in u.up_blocks[:-1]:
            n = len(block.resnets)
            take, res = res[-n:], res[:-n]
            if _cross(block):
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=take, encoder_hidden_states=ehs)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=take)
        return h

    def _shallow_out(self, h, emb, ehs, *res):
        u = self.unet
        block = u.up_blocks[-1]
        if _cross(block):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=tuple(res), encoder_hidden_states=ehs)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=tuple(res))
        if u.conv_norm_out:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)

    # -- the forward the pipeline calls ---------------------------------------------------------

    def _can_split(self, sample: torch.Tensor, kw: dict[str, Any]) -> bool:
        if any(kw.get(k) is not None for k in (
                "class_labels", "attention_mask", "encoder_attention_mask", "cross_attention_kwargs",
                "down_block_additional_residuals", "mid_block_additional_residual",
                "down_intrablock_additional_residuals")):
            return False
        factor = 2 ** self.unet.num_upsamplers
        return all(d % factor == 0 for d in sample.shape[-2:])

    @staticmethod
    def _mark(rows: int, *tensors: Any) -> None:
        """Batch rows are a dynamic dimension of every piece's inputs: one graph per bucket serves
        every batch size (sizes 0/1 are always specialised by dynamo, so rows 1 gets its own)."""
        if rows < 2:
            return
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows:
                torch._dynamo.maybe_mark_dynamic(t, 0)

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kw):
        if args or not self._can_split(sample, kw):
            return self.original_forward(sample, timestep, encoder_hidden_states, *args, **kw)
        if self.cudagraphs:
            # Each call is a new iteration for CUDA-graph trees; what we keep across calls is cloned.
            torch.compiler.cudagraph_mark_step_begin()
        added = kw.get("added_cond_kwargs")
        rows = sample.shape[0]
        self._mark(rows, sample, encoder_hidden_states, kw.get("timestep_cond"), *(added or {}).values())
        emb, ehs, h, *res = self.shallow_in(sample, timestep, encoder_hidden_states, kw.get("timestep_cond"), added)
        self._mark(rows, emb, ehs, h, *res)
        slot, self.slot = self.slot, self.slot + 1
        kept = self.cached.get(slot)
        if (self.draft_interval > 1 and self.step % self.draft_interval != 0
                and kept is not None and kept.shape[0] == rows):
            deep = kept
            self.counts["reused"] += 1
        else:
            deep = self.deep(h, emb, ehs, *res[self.k:])
            self.counts["full"] += 1
            if self.draft_interval > 1:
                self.cached[slot] = deep.clone() if self.cudagraphs else deep
        self._mark(rows, deep)
        out = self.shallow_out(deep, emb, ehs, *res[: self.k])
        if kw.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    def begin_step(self, step: int) -> None:
        """The pipeline's step callback: the next UNet calls are denoising step `step`."""
        if step != self.step:
            self.step, self.slot = step, 0

    def invalidate(self) -> None:
        """Rows left the batch: the next step runs in full (slots no longer match tasks)."""
        self.cached = {}

    @contextlib.contextmanager
    def draft(self, interval: int) -> Iterator[None]:
        """Steps that are not multiples of `interval` reuse the last full step's deep features
        (one pipeline run; the caller reports steps through `begin_step`)."""
        self.draft_interval, self.step, self.slot, self.cached = interval, 0, 0, {}
        try:
            yield
        finally:
            self.draft_interval, self.step, self.slot, self.cached = 0, 0, 0, {}


def install(unet: Any, compile_fn: Callable[[Callable], Callable] | None = None) -> SplitUNet:
    """Route `unet(...)` through a `SplitUNet` (idempotent: returns the installed one)."""
    existing = getattr(unet, _KEY, None)
    if existing is not None:
        return existing
    if not supports(unet):
        raise ValueError(f"{type(unet).__name__} has no standard UNet block layout to split")
    split = SplitUNet(unet, compile_fn)
    object.__setattr__(unet, _KEY, split)  # not a submodule: no state-dict entry
    unet.forward = split.forward
    return split


def installed(unet: Any) -> SplitUNet | None:
    return getattr(unet, _KEY, None)


@contextlib.contextmanager
def draft(unet: Any, interval: int) -> Iterator[None]:
    """Draft denoising for one pipeline call; a no-op at interval <= 1 or without a split UNet."""
    split = installed(unet)
    if split is None or interval <= 1:
        yield
        return
    with split.draft(interval):
        yield


def begin_step(unet: Any, step: int) -> None:
    split = installed(unet)
    if split is not None:
        split.begin_step(step)


def invalidate(unet: Any) -> None:
    split = installed(unet)
    if split is not None:
        split.invalidate()
