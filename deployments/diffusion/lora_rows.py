"""Mixed-adapter batches in placeholder-slot mode (issue 21; docs/lora.md, "Mixed-adapter batches").

Every placeholder slot's LoRA runs on every row anyway (lora_slots.py: all slots stay active, weight
0 when unused), so tasks with different adapter sets can share one pipeline call if each row gets
its own weights: row r of the UNet batch adds `sum_s w[r, s] * B_s(A_s(x_r))`, w = 0 where the
row's task doesn't use slot s. This is the diffusion analogue of vLLM's per-row LoRA (punica/S-LoRA).

How the weights reach the layers, without anything a compiled UNet guards on changing:
- `RowScales.weights` is one preallocated [slots, capacity] tensor, written in place. A forward hook
  on every slot's `lora_B` multiplies its output by `weights[slot, :rows]` viewed to broadcast over
  the row (rows is the output's dynamic batch dim). PEFT then multiplies by its own `scaling`, which
  stays 1.0 in this mode (lora_slots.keep_scales_as_tensors): `B(A x) * w * 1.0` equals the ordinary
  manager's `B(A x) * w` bit for bit in float32, and a weight-0 row adds exact zeros (base pixels).
- The engine passes a [rows, slots] tensor per call as `cross_attention_kwargs[KEY]` (rows in the
  pipeline's order: [negative; positive] under CFG, each task's weights twice). Riding in the UNet's
  kwargs, it is sliced with the batch wherever the batch is: `hooks.per_task_calls` (batch
  invariance) takes each task's rows of it, and sdxl.run shrinks it when a cancelled task leaves.
  `RowScales.forward`, installed as the UNet's `forward` (outside the compiled pieces), pops it and
  writes it into `weights` before the real forward runs.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from deployments.diffusion.types import LoraUse

KEY = "genserve_lora_rows"
_CAPACITY = 64  # rows; grows (a new tensor: one recompile) if a call ever has more


class RowScales:
    def __init__(self, unet: torch.nn.Module, slots: list[str], layers: list[str]) -> None:
        param = next(unet.parameters())
        with torch.inference_mode(False):  # written in place under the engine's inference mode
            self.weights = torch.zeros(len(slots), _CAPACITY, dtype=param.dtype, device=param.device)
        for name in layers:
            module: Any = unet.get_submodule(name)  # a PEFT LoRA layer (untyped lora_B ModuleDict)
            for i, slot in enumerate(slots):
                module.lora_B[slot].register_forward_hook(partial(self._scale, i))
        self._inner = unet.forward  # the class's forward, or unet_split's (installed before us)
        unet.forward = self.forward

    def _scale(self, slot: int, module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        w = self.weights[slot, : out.shape[0]]
        return out * w.view(-1, *([1] * (out.dim() - 1)))

    @torch.no_grad()
    def write(self, rows: torch.Tensor) -> None:
        """Row weights [rows, slots] for the next UNet call."""
        n = rows.shape[0]
        if n > self.weights.shape[1]:
            with torch.inference_mode(False):
                self.weights = self.weights.new_zeros(self.weights.shape[0], 1 << (n - 1).bit_length())
        self.weights[:, :n].copy_(rows.T)

    @torch.no_grad()
    def uniform(self, weights: torch.Tensor) -> None:
        """Every row the same slot weights [slots] (a UNet call without KEY keeps them)."""
        self.weights.copy_(weights.to(self.weights)[:, None].expand_as(self.weights))

    def forward(self, *args: Any, **kw: Any) -> Any:
        extra = kw.get("cross_attention_kwargs")
        if extra and KEY in extra:
            extra = dict(extra)  # the pipeline's own dict is passed again next step
            self.write(extra.pop(KEY))
            kw["cross_attention_kwargs"] = extra or None  # unet_split runs split only without any
        return self._inner(*args, **kw)


def pipeline_rows(weights: torch.Tensor, cfg: bool, like: torch.Tensor) -> dict[str, Any]:
    """`cross_attention_kwargs` carrying per-task slot weights [tasks, slots] as UNet rows."""
    rows = torch.cat([weights, weights]) if cfg else weights
    return {KEY: rows.to(device=like.device)}  # float32; RowScales.write casts to the UNet dtype


def split_by_slots(tasks: list[tuple[LoraUse, ...]], slots: int) -> list[list[int]]:
    """Task indices in sub-batches whose adapters' union fits in `slots` (first fit, order kept)."""
    batches: list[tuple[list[int], set[str]]] = []
    for i, loras in enumerate(tasks):
        ids = {u.adapter_id for u in loras}
        for members, union in batches:
            if len(union | ids) <= slots:
                members.append(i)
                union |= ids
                break
        else:
            batches.append(([i], ids))
    return [members for members, _ in batches]
