"""Placeholder LoRA slots for a compiled engine (issue 21; docs/lora.md, "Compiled engine").

diffusers' documented way to swap LoRAs into a compiled UNet without recompiling is to load an
adapter *before* compiling. With `lora.hotswap_target_rank` set, `LoraManager` builds
`PlaceholderSlots` before the warm-up: every slot gets a zero LoRA (rank `hotswap_target_rank`, on
every UNet layer matching `lora.hotswap_target_modules`, loaded with `load_lora_weights` from an
in-memory state dict: no download). The warm-up then compiles the UNet with these layers, and no
request changes anything Dynamo guards on:
- every slot stays active (PEFT's active-adapter list, and the `requires_grad` that `set_adapter`
  toggles, never change); a slot a request doesn't use runs at weight 0, which adds exact zeros
  (x * 0 = 0 for finite x): a request without adapters gets the base pixels (tested);
- PEFT's per-layer scale is one tensor per layer and slot, kept at 1.0 (`keep_scales_as_tensors`);
  the weights are applied per UNet row by lora_rows.py (mixed-adapter batches), also in place;
- an adapter is copied into its slot's lora_A/lora_B in place (`fill`), zero-padded to the slot's
  rank and zero on layers it doesn't target; evicting it zeroes the slot again (`clear`);
- with `optimize.fuse_qkv`, the fused `to_qkv`/`to_kv` also hold a placeholder (rank `rank` per
  fused part), into which `fill` writes the adapter's q/k/v parts composed (lora_fused.py).
An adapter the placeholder can't hold (a UNet layer outside the target modules, a larger rank,
DoRA or LoRA-bias tensors, no UNet weights at all) is refused with `AdapterIncompatible` (400) when
it is staged, before it touches the pipeline. The text encoders are not compiled: their part of an
adapter is loaded and deleted the ordinary way (lora.py).
"""

from __future__ import annotations

from typing import Any

import torch

from deployments.adapters import AdapterIncompatible
from deployments.diffusion.lora_fused import compose, fused_groups


def _matches(name: str, patterns: list[str]) -> bool:
    """PEFT's `target_modules` list rule: the name equals an entry or ends with `.<entry>`."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _lora_shapes(layer: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lora_A, lora_B) weight shapes PEFT gives `layer` at `rank`."""
    if isinstance(layer, torch.nn.Linear):
        return (rank, layer.in_features), (layer.out_features, rank)
    if isinstance(layer, torch.nn.Conv2d) and layer.groups == 1:
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    raise ValueError(f"{type(layer).__name__} layers can't hold a LoRA placeholder (Linear and Conv2d can)")


def target_layers(unet: torch.nn.Module, patterns: list[str], rank: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """UNet layer name -> its (lora_A, lora_B) shapes, for every layer `patterns` match. Raises
    ValueError (the replica fails to start) for a pattern that matches nothing or a non-leaf layer."""
    out: dict[str, tuple[tuple[int, ...], ...]] = {}
    for name, module in unet.named_modules():
        if name and _matches(name, patterns):
            try:
                out[name] = _lora_shapes(module, rank)
            except ValueError as exc:
                raise ValueError(f"lora.hotswap_target_modules matches UNet layer {name!r}: {exc}") from None
    unused = [p for p in patterns if not any(_matches(n, [p]) for n in out)]
    if unused:
        raise ValueError(f"lora.hotswap_target_modules {unused} match no UNet layer")
    return out


class PlaceholderSlots:
    def __init__(self, pipeline: Any, slots: list[str], *, rank: int, patterns: list[str]) -> None:
        self.pipeline, self.slots, self.rank, self.patterns = pipeline, slots, rank, patterns
        unet = pipeline.unet
        self.shapes = target_layers(unet, patterns, rank)  # what an adapter may target (`check`)
        # optimize.fuse_qkv: the attention calls the fused to_qkv/to_kv, so a fused layer with a
        # target among its parts holds a placeholder too, a rank-`rank` block per part (lora_fused.py).
        self.fused = {f: parts for f, parts in fused_groups(unet).items() if any(p in self.shapes for p, _ in parts)}
        if clash := sorted(set(self.fused) & set(self.shapes)):
            raise ValueError(f"lora.hotswap_target_modules matches the fused projection {clash[0]!r} "
                             "(optimize.fuse_qkv): list to_q/to_k/to_v instead, which are composed onto it")
        layers = {**self.shapes, **{f: _lora_shapes(unet.get_submodule(f), rank * len(parts))
                                    for f, parts in self.fused.items()}}
        param = next(unet.parameters())
        for slot in slots:
            # Fresh zeros per slot: PEFT may adopt the given tensors as the parameters (assign=True),
            # and `fill` writes into them in place.
            zero = {f"unet.{name}.lora_{ab}.weight": torch.zeros(shape, dtype=param.dtype, device=param.device)
                    for name, (a, b) in layers.items() for ab, shape in (("A", a), ("B", b))}
            pipeline.load_lora_weights(zero, adapter_name=slot)
        # slot -> layer -> (lora_A weight, lora_B weight): the tensors `fill` and `clear` write.
        self.layers = list(layers)  # every UNet layer holding a placeholder (lora_rows hooks them)
        self._params: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {
            slot: {name: (unet.get_submodule(name).lora_A[slot].weight, unet.get_submodule(name).lora_B[slot].weight)
                   for name in layers} for slot in slots}
        self._scales: dict[tuple[int, str], torch.Tensor] = {}  # (layer, slot) -> its weight

    def check(self, aid: str, sd: dict[str, torch.Tensor]) -> None:
        """Raise AdapterIncompatible unless `fill` can hold adapter `aid` exactly."""
        unet = {k.removeprefix("unet."): v for k, v in sd.items() if k.startswith("unet.")}
        if not unet:
            raise AdapterIncompatible(f"LoRA adapter {aid} has no UNet weights; this model's compiled engine serves "
                                      "adapters with UNet weights only")
        outside: set[str] = set()
        for key, t in unet.items():
            layer, sep, part = key.rpartition(".lora_")
            if not sep or part not in ("A.weight", "B.weight"):
                raise AdapterIncompatible(f"LoRA adapter {aid}: tensor {key!r} is not a plain LoRA weight (lora_A/"
                                          "lora_B); DoRA and LoRA bias can't be served by this model's compiled engine")
            if layer not in self.shapes:
                outside.add(layer)
                continue
            want = self.shapes[layer][0 if part == "A.weight" else 1]
            rank_dim = 0 if part == "A.weight" else 1
            other = [d for i, d in enumerate(t.shape) if i != rank_dim]
            if len(t.shape) != len(want) or other != [d for i, d in enumerate(want) if i != rank_dim]:
                raise AdapterIncompatible(f"LoRA adapter {aid}: {key!r} has shape {tuple(t.shape)}, which doesn't "
                                          f"fit this model's layer (expected {want} up to the rank)")
            if t.shape[rank_dim] > self.rank:
                raise AdapterIncompatible(f"LoRA adapter {aid} has rank {t.shape[rank_dim]}, more than this model's "
                                          f"lora.hotswap_target_rank ({self.rank})")
        if outside:
            raise AdapterIncompatible(
                f"LoRA adapter {aid} targets UNet layers outside this model's lora.hotswap_target_modules "
                f"{self.patterns} (e.g. {sorted(outside)[0]!r}); its compiled engine can't add layers")
        for layer in {k.rpartition(".lora_")[0] for k in unet}:
            a, b = unet.get(f"{layer}.lora_A.weight"), unet.get(f"{layer}.lora_B.weight")
            if a is None or b is None or a.shape[0] != b.shape[1]:
                raise AdapterIncompatible(f"LoRA adapter {aid}: layer {layer!r} needs a lora_A and a lora_B of "
                                          "the same rank")

    @torch.no_grad()
    def fill(self, slot: str, sd: dict[str, torch.Tensor]) -> None:
        """Write a `check`ed adapter's UNet part into `slot` in place (alpha/r is already folded
        into lora_B by read_adapter, and the slot's alpha equals its rank: scale 1 x weight)."""
        sd = compose("", sd, self.fused, block_rank=self.rank)  # no-op without fused layers
        for layer, (a, b) in self._params[slot].items():
            a.data.zero_()
            b.data.zero_()
            new_a, new_b = sd.get(f"unet.{layer}.lora_A.weight"), sd.get(f"unet.{layer}.lora_B.weight")
            if new_a is not None and new_b is not None:
                a.data[: new_a.shape[0]].copy_(new_a)
                b.data[:, : new_b.shape[1]].copy_(new_b)

    @torch.no_grad()
    def clear(self, slot: str) -> None:
        for a, b in self._params[slot].values():
            a.data.zero_()
            b.data.zero_()

    def keep_scales_as_tensors(self) -> None:
        """`set_adapters` writes each weight into PEFT's per-layer `scaling` as a Python float, which
        a compiled UNet specializes on (one recompile per distinct weight: measured by
        benchmarks/lora_compile_hotswap.py). Keep one tensor per layer and slot instead, the same
        object every time, at 1.0: the slot's weight is applied per row (lora_rows.RowScales), so
        rows of one call may weigh it differently, and `B(A x) * w * 1.0` is still exactly `* w`."""
        with torch.inference_mode(False), torch.no_grad():
            for module in self.pipeline.unet.modules():
                scaling = getattr(module, "scaling", None)
                if not isinstance(scaling, dict):
                    continue
                for slot in list(scaling):
                    kept = self._scales.get((id(module), slot))
                    if kept is None:
                        kept = self._scales[id(module), slot] = torch.tensor(1.0, device=module.weight.device)
                    scaling[slot] = kept
