"""LoRA adapters on a UNet with fused attention projections (`optimize.fuse_qkv`; docs/lora.md).

diffusers' `fuse_qkv_projections` gives every `Attention` a fused Linear whose weight is its
projections' concatenated along the output dim, q then k then v (`Attention.fuse_projections`):
`to_qkv` = [to_q; to_k; to_v] in self-attention, `to_kv` = [to_k; to_v] in cross-attention (whose
`to_q` stays), and `FusedAttnProcessor2_0` calls the fused Linear and splits its output in that
order. A LoRA on `to_q/to_k/to_v` alone is then never called: the image would silently lose those
parts of the adapter. So an adapter's parts are also composed onto the fused Linear:

    A = concat(A_q, A_k, A_v) along the rank dim,  B = block_diag(B_q, B_k, B_v)

and B A x = [B_q A_q x; B_k A_k x; B_v A_v x], exactly the separate layers' LoRA terms at the
processor's split offsets (alpha/r is already folded into each B by read_adapter, so one scale per
fused layer is right). The separate layers keep their LoRA as well: the IP-Adapter processors
(ip_adapter.py) call a fused UNet's cross-attention `to_k/to_v`, so whichever path runs has it.
"""

from __future__ import annotations

from typing import Any

import torch

from deployments.adapters import AdapterIncompatible

# fused layer -> its parts in weight order, each (layer name, out_features); UNet module names.
FusedGroups = dict[str, list[tuple[str, int]]]


def fused_groups(unet: torch.nn.Module) -> FusedGroups:
    """The fused projections of `unet` (empty unless `fuse_qkv_projections` ran)."""
    out: FusedGroups = {}
    for name, module in unet.named_modules():
        if not getattr(module, "fused_projections", False):
            continue
        for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v"))):
            if isinstance(getattr(module, fused, None), torch.nn.Linear):
                out[f"{name}.{fused}"] = [(f"{name}.{p}", int(getattr(module, p).weight.shape[0])) for p in parts]
    return out


_block_diag: Any = torch.block_diag  # untyped in torch


def _layer(key: str) -> str:
    return key.removeprefix("unet.").split(".lora_")[0]


def compose(aid: str, sd: dict[str, torch.Tensor], groups: FusedGroups, *,
            block_rank: int | None = None) -> dict[str, torch.Tensor]:
    """`sd` (a pipeline state dict: `unet.<layer>.lora_A.weight`) plus a LoRA on each fused layer
    composed from its parts'. `block_rank`: each part gets its own zero-padded block of that rank
    (a placeholder slot's fixed layout, rank len(parts) x block_rank); None: only the parts the
    adapter has, packed. Raises AdapterIncompatible for parts that are not plain LoRA weights."""
    parts_of = {p for parts in groups.values() for p, _ in parts}
    bad = [k for k in sd if (layer := _layer(k)) in groups
           or (layer in parts_of and not k.endswith((".lora_A.weight", ".lora_B.weight")))]
    bad += [f"unet.{p}.lora_B.weight" for p in parts_of
            if (f"unet.{p}.lora_A.weight" in sd) != (f"unet.{p}.lora_B.weight" in sd)]
    if bad:  # DoRA, LoRA bias, or weights for the fused layer itself: no exact composition
        raise AdapterIncompatible(f"LoRA adapter {aid}: {bad[0]!r} can't be composed onto the fused q/k/v "
                                  "projections of this model's optimize.fuse_qkv (plain to_q/to_k/to_v LoRA only)")
    out = dict(sd)
    for fused, parts in groups.items():
        pairs = [(sd.get(f"unet.{p}.lora_A.weight"), sd.get(f"unet.{p}.lora_B.weight")) for p, _ in parts]
        present = [a for a, _ in pairs if a is not None]
        if not present:
            continue
        like = present[0]
        a_blocks, b_blocks = [], []
        for (a, b), (_, rows) in zip(pairs, parts, strict=True):
            if a is None or b is None:  # a part the adapter doesn't train: no rank, zero rows
                a, b = like.new_zeros(0, like.shape[1]), like.new_zeros(rows, 0)
            if block_rank is not None:
                a = torch.cat([a, a.new_zeros(block_rank - a.shape[0], a.shape[1])])
                b = torch.cat([b, b.new_zeros(b.shape[0], block_rank - b.shape[1])], dim=1)
            a_blocks.append(a)
            b_blocks.append(b)
        out[f"unet.{fused}.lora_A.weight"] = torch.cat(a_blocks)
        out[f"unet.{fused}.lora_B.weight"] = _block_diag(*b_blocks)
    return out
