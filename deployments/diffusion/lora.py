"""LoRA adapters on one diffusion replica (issue 21): the base pipeline stays loaded once; adapters
go into a fixed number of named slots with diffusers' PEFT integration.

Who calls what, and on which thread:
- `stage(ids)` — from Serve's multiplexed loader (`DiffusionDeployment`), in a worker thread: fetch
  each adapter's directory (`AdapterSource`) and read its weights into CPU memory. It holds the
  set; `release(ids)` (Serve evicted the set, LRU) lets go of it.
- `activate(loras)` — from the engine, under its pipeline lock, before each group's pipeline call:
  the only place the pipeline changes. It loads what the group needs (from the staged copy, or
  fetches it now if the set was evicted meanwhile), unloads released adapters nothing needs, then
  `set_adapters(slots, weights)`; a group without adapters runs with `disable_lora()`, which in
  PEFT is exactly the base layer's forward (pixel-identical to a replica that never loaded one).

A batch may mix adapter sets (the replica's own batcher, unlike `@serve.batch`, does not split by
multiplexed id): `ImageTask.group_key()` includes the adapter set, so each set gets its own call.

Weights: PEFT's `lora_alpha / r` is folded into `lora_B` at load, so diffusers' convention
(alpha = rank, scale 1) reproduces the adapter exactly and a task's `weight` is the only scale.

Compiled engine: with `hotswap_target_rank`, `enable_lora_hotswap(target_rank=...)` is called
before the first load and a slot that held an adapter gets the next one with `hotswap=True`
(UNet weights replaced in place, no recompile; text encoders, which are not compiled and which
diffusers won't hot-swap, get their part deleted and reloaded). Adapter weights are kept as tensors
in PEFT's `scaling` so a new weight does not recompile either. What still recompiles (the first
adapter per slot, the first `disable_lora`) is measured by benchmarks/lora_compile_hotswap.py;
see docs/lora.md.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from pathlib import Path
from typing import Any

import torch

from deployments.adapters import AdapterSource
from deployments.diffusion.types import LoraUse

logger = logging.getLogger("genserve.diffusion.lora")

_PEFT_PREFIX = "base_model.model."
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_PIPELINE_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")


def _match(module: str, pattern: dict[str, Any], default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern: a key matches a module path that ends with it."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def read_adapter(path: Path) -> dict[str, torch.Tensor]:
    """A PEFT LoRA directory as a diffusers pipeline state dict (`unet.<module>.lora_A.weight`),
    with alpha/r folded into lora_B."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    weights = load_file(str(path / "adapter_model.safetensors"))
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        name = "unet." + key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        if not name.startswith(_PIPELINE_PREFIXES):
            raise ValueError(f"adapter tensor {key!r} is not for an SDXL pipeline")
        if ".lora_B." in name:
            module = name.split(".lora_B.")[0].split(".", 1)[1]
            scale = float(_match(module, alphas, alpha)) / int(_match(module, ranks, r))
            if scale != 1.0:
                tensor = tensor * scale
        out[name] = tensor.contiguous()
    return out


class LoraManager:
    def __init__(self, pipeline: Any, source: AdapterSource, *, slots: int,
                 hotswap_target_rank: int | None = None) -> None:
        self.pipeline, self.source, self.slots = pipeline, source, slots
        self.hotswap = hotswap_target_rank is not None
        if self.hotswap:
            pipeline.enable_lora_hotswap(target_rank=hotswap_target_rank, check_compiled="warn")
        self._lock = threading.Lock()  # guards the bookkeeping below (stage/release vs activate)
        self._staged: dict[str, dict[str, torch.Tensor]] = {}  # CPU copies of held adapters
        self._holds: Counter[str] = Counter()  # adapter id -> cached sets holding it
        self._loaded: OrderedDict[str, str] = OrderedDict()  # adapter id -> slot name, LRU order
        self._used_slots: set[str] = set()  # slots that ever held an adapter (hotswap targets)
        self._active: tuple[tuple[str, float], ...] | None = None
        self._scale_tensors: dict[tuple[int, str], torch.Tensor] = {}  # hotswap: (layer, slot) -> its weight
        # Timings for stats and the benchmark (seconds): loading into the pipeline, and switching
        # the active set among loaded adapters.
        self.load_s: deque[float] = deque(maxlen=1000)
        self.switch_s: deque[float] = deque(maxlen=1000)
        self.loads = self.unloads = 0
        # Adapter sets Serve's multiplexed LRU staged (its cache misses) and released (its evictions).
        self.sets_staged = self.sets_released = 0

    # -- from Serve's multiplexed loader (worker thread) ---------------------------------------

    def stage(self, adapter_ids: tuple[str, ...]) -> None:
        with self._lock:
            self.sets_staged += 1
        for aid in adapter_ids:
            with self._lock:
                have = aid in self._staged
            sd = None if have else read_adapter(self.source.fetch(aid))
            with self._lock:
                if sd is not None:
                    self._staged.setdefault(aid, sd)
                self._holds[aid] += 1

    def release(self, adapter_ids: tuple[str, ...]) -> None:
        with self._lock:
            self.sets_released += 1
            for aid in adapter_ids:
                self._holds[aid] -= 1
                if self._holds[aid] <= 0:
                    del self._holds[aid]
                    self._staged.pop(aid, None)

    # -- from the engine, under its pipeline lock ------------------------------------------------

    def check(self, loras: tuple[LoraUse, ...]) -> None:
        ids = [u.adapter_id for u in loras]
        if len(set(ids)) != len(ids):
            raise ValueError(f"loras names an adapter twice: {ids}")
        if len(ids) > self.slots:
            raise ValueError(f"loras has {len(ids)} adapters, more than this model's lora.max_adapters_per_replica "
                             f"({self.slots})")

    def activate(self, loras: tuple[LoraUse, ...]) -> None:
        want = tuple((u.adapter_id, float(u.weight)) for u in loras)
        needed = {aid for aid, _ in want}
        t0 = time.perf_counter()
        with self._lock:
            released = [aid for aid in self._loaded if aid not in self._holds and aid not in needed]
        for aid in released:  # Serve evicted their sets: free the slots (and the memory)
            self._unload(aid)
        loaded_any = False
        for aid, _ in want:
            if aid not in self._loaded:
                self._load(aid, keep=needed)
                loaded_any = True
            self._loaded.move_to_end(aid)
        if want == self._active and not loaded_any:
            return
        if not want:
            if self._loaded:
                self.pipeline.disable_lora()
        else:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([self._loaded[aid] for aid, _ in want], [w for _, w in want])
            if self.hotswap:
                self._scalings_as_tensors()
        self._active = want
        if not loaded_any:
            self.switch_s.append(time.perf_counter() - t0)

    def _scalings_as_tensors(self) -> None:
        """`set_adapters` writes each weight into PEFT's per-layer `scaling` as a Python float, which
        a compiled UNet specializes on: one recompile per distinct weight (measured:
        benchmarks/lora_compile_hotswap.py). Keep one tensor per layer and slot instead and write the
        value into it in place, as PEFT's own compiled-hotswap preparation does."""
        with torch.inference_mode(False), torch.no_grad():
            for module in self.pipeline.unet.modules():
                scaling = getattr(module, "scaling", None)
                if not isinstance(scaling, dict):
                    continue
                for slot, value in scaling.items():
                    if isinstance(value, torch.Tensor):
                        continue
                    kept = self._scale_tensors.get((id(module), slot))
                    if kept is None:
                        kept = self._scale_tensors[id(module), slot] = torch.tensor(float(value),
                                                                                     device=module.weight.device)
                    else:
                        kept.fill_(float(value))
                    scaling[slot] = kept

    def _free_slot(self, keep: set[str]) -> str:
        taken = set(self._loaded.values())
        for i in range(self.slots):
            if f"slot{i}" not in taken:
                return f"slot{i}"
        victim = next(aid for aid in self._loaded if aid not in keep)  # LRU first
        return self._unload(victim)

    def _load(self, aid: str, keep: set[str]) -> None:
        t0 = time.perf_counter()
        with self._lock:
            sd = self._staged.get(aid)
        if sd is None:  # its set was evicted before this group ran: a cold fetch now
            sd = read_adapter(self.source.fetch(aid))
        slot = self._free_slot(keep)
        hotswap = self.hotswap and slot in self._used_slots
        if hotswap:
            self._hotswap(sd, slot)
        else:  # load_lora_weights consumes (pops) the dict it is given: hand it a shallow copy.
            self.pipeline.load_lora_weights(dict(sd), adapter_name=slot)
        self._used_slots.add(slot)
        self._loaded[aid] = slot
        self._active = None
        self.loads += 1
        self.load_s.append(time.perf_counter() - t0)
        logger.info("adapter %s loaded into %s in %.3fs%s", aid, slot, self.load_s[-1], " (hotswap)" if hotswap else "")

    def _hotswap(self, sd: dict[str, torch.Tensor], slot: str) -> None:
        """Replace a used slot's adapter. diffusers hotswaps only the UNet ("not supported for text
        encoders"), and only the UNet is compiled; so the slot's old text-encoder layers (the
        previous adapter's, which would otherwise stay active under the new one) are deleted and
        the new adapter's text-encoder part, if any, is loaded the ordinary way."""
        from diffusers.utils.peft_utils import delete_adapter_layers

        delete_layers: Any = delete_adapter_layers  # untyped in diffusers
        unet = {k: v for k, v in sd.items() if k.startswith("unet.")}
        if not unet:  # nothing to swap in: the previous adapter's UNet weights would stay active
            raise ValueError("an adapter without UNet weights can't be hot-swapped into a compiled engine")
        for name in _TEXT_ENCODERS:
            encoder = getattr(self.pipeline, name, None)
            if encoder is not None and any(slot in getattr(m, "lora_A", ()) for m in encoder.modules()):
                delete_layers(encoder, slot)
        self.pipeline.load_lora_weights(unet, adapter_name=slot, hotswap=True)
        text = {k: v for k, v in sd.items() if not k.startswith("unet.")}
        if text:
            self.pipeline.load_lora_weights(text, adapter_name=slot)

    def _unload(self, aid: str) -> str:
        slot = self._loaded.pop(aid)
        if not self.hotswap:  # with hotswap the slot keeps its layers; the next load replaces the weights
            self.pipeline.delete_adapters(slot)
        self._active = None
        self.unloads += 1
        return slot

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def stats(self) -> dict[str, Any]:
        return {"lora_loaded": len(self._loaded), "lora_staged": len(self._staged), "lora_loads": self.loads,
                "lora_unloads": self.unloads, "lora_sets_staged": self.sets_staged,
                "lora_sets_released": self.sets_released}
