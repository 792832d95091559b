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
multiplexed id). Ordinary manager: `ImageTask.group_key()` includes the adapter set, so each set gets
its own call. Placeholder slots: tasks whose adapters are UNet-only share one call whatever their
sets (`mixes`, `activate_rows`: per-row weights, lora_rows.py), as long as the union fits the slots.

Weights: PEFT's `lora_alpha / r` is folded into `lora_B` at load, so diffusers' convention
(alpha = rank, scale 1) reproduces the adapter exactly and a task's `weight` is the only scale.

Compiled engine: with `hotswap_target_rank`, the manager is built before the warm-up and fills
every slot with a zero placeholder LoRA (lora_slots.py); adapters are then written into the slots'
UNet layers in place, every slot stays active (weight 0 when a group doesn't use it), and the
weights are tensors, so no request recompiles (benchmarks/lora_compile_hotswap.py measures it).
Text encoders, which are not compiled, get their part of an adapter loaded and deleted the
ordinary way. See docs/lora.md.
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
from deployments.diffusion.config import DEFAULT_HOTSWAP_TARGETS
from deployments.diffusion.lora_fused import compose, fused_groups
from deployments.diffusion.lora_rows import RowScales
from deployments.diffusion.lora_slots import PlaceholderSlots
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
                 hotswap_target_rank: int | None = None, hotswap_target_modules: list[str] | None = None) -> None:
        self.pipeline, self.source, self.slots = pipeline, source, slots
        # Compiled engine: zero placeholders in every slot, before the warm-up compiles the UNet.
        self.placeholders: PlaceholderSlots | None = None
        if hotswap_target_rank is not None:
            self.placeholders = PlaceholderSlots(pipeline, [f"slot{i}" for i in range(slots)],
                                                 rank=hotswap_target_rank,
                                                 patterns=list(hotswap_target_modules or DEFAULT_HOTSWAP_TARGETS))
        # Per-row slot weights (mixed-adapter batches); every slot at weight 0 until a group says otherwise.
        self.rows = RowScales(pipeline.unet, self.placeholders.slots, self.placeholders.layers) \
            if self.placeholders is not None else None
        # optimize.fuse_qkv without placeholders: the attention calls the fused to_qkv/to_kv, so each
        # adapter's q/k/v parts are composed onto them when it is read (lora_fused.py). Composing
        # rather than unfusing keeps fuse_qkv's speed for every request, and the math is the same
        # code the placeholder slots use; it is exact (tests/test_diffusion_lora_fused.py).
        self.fused = fused_groups(pipeline.unet) if self.placeholders is None else {}
        self._lock = threading.Lock()  # guards the bookkeeping below (stage/release vs activate)
        self._staged: dict[str, dict[str, torch.Tensor]] = {}  # CPU copies of held adapters
        self._holds: Counter[str] = Counter()  # adapter id -> cached sets holding it
        self._loaded: OrderedDict[str, str] = OrderedDict()  # adapter id -> slot name, LRU order
        self._active: tuple[tuple[str, float], ...] | None = None
        self._unet_only: dict[str, bool] = {}  # adapter id -> it has no text-encoder weights (`mixes`)
        # Timings for stats and the benchmark (seconds): loading into the pipeline, and switching
        # the active set among loaded adapters.
        self.load_s: deque[float] = deque(maxlen=1000)
        self.switch_s: deque[float] = deque(maxlen=1000)
        self.loads = self.unloads = 0
        # Adapter sets Serve's multiplexed LRU staged (its cache misses) and released (its evictions).
        self.sets_staged = self.sets_released = 0
        if self.placeholders is not None:  # the state every request will see: all slots on, weight 0
            self._set_slot_weights(())
            self._active = ()

    def _read(self, aid: str) -> dict[str, torch.Tensor]:
        sd = read_adapter(self.source.fetch(aid))
        if self.placeholders is not None:
            self.placeholders.check(aid, sd)  # AdapterIncompatible (400) before it nears the pipeline
            self._unet_only[aid] = all(k.startswith("unet.") for k in sd)
        elif self.fused:
            sd = compose(aid, sd, self.fused)
        return sd

    # -- from Serve's multiplexed loader (worker thread) ---------------------------------------

    def stage(self, adapter_ids: tuple[str, ...]) -> None:
        fresh: dict[str, dict[str, torch.Tensor]] = {}
        for aid in adapter_ids:  # read (and check) them all before holding any: a refused set holds nothing
            with self._lock:
                have = aid in self._staged
            if not have:
                fresh[aid] = self._read(aid)
        with self._lock:
            self.sets_staged += 1
            for aid in adapter_ids:
                if aid in fresh:
                    self._staged.setdefault(aid, fresh[aid])
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

    def mixes(self, loras: tuple[LoraUse, ...]) -> bool:
        """Whether a task with `loras` may share a pipeline call with other adapter sets: placeholder
        slots (per-row weights) and UNet-only adapters (the text encoders are not per row). An
        adapter not read yet counts as not UNet-only: it just runs in its own set's group."""
        return self.placeholders is not None and all(self._unet_only.get(u.adapter_id, False) for u in loras)

    def _ensure(self, ids: list[str]) -> bool:
        """Load the adapters `ids` (all fit the slots at once), after freeing released ones; True
        if any was loaded."""
        needed = set(ids)
        with self._lock:
            released = [aid for aid in self._loaded if aid not in self._holds and aid not in needed]
        for aid in released:  # Serve evicted their sets: free the slots (and the memory)
            self._unload(aid)
        loaded_any = False
        for aid in ids:
            if aid not in self._loaded:
                self._load(aid, keep=needed)
                loaded_any = True
            self._loaded.move_to_end(aid)
        return loaded_any

    def activate_rows(self, sets: list[tuple[LoraUse, ...]]) -> torch.Tensor:
        """Placeholder slots: load every adapter of a group's tasks (one set per task; their union
        must fit the slots) and return the tasks' slot weights [tasks, slots], for lora_rows."""
        assert self.placeholders is not None and self.rows is not None
        ids = list(dict.fromkeys(u.adapter_id for loras in sets for u in loras))
        if len(ids) > self.slots:
            raise ValueError(f"a group needs {len(ids)} adapters, more than lora.max_adapters_per_replica ({self.slots})")
        t0 = time.perf_counter()
        loaded_any = self._ensure(ids)
        column = {slot: i for i, slot in enumerate(self.placeholders.slots)}
        weights = torch.zeros(len(sets), len(column))
        for row, loras in enumerate(sets):
            for u in loras:
                weights[row, column[self._loaded[u.adapter_id]]] = float(u.weight)
        # The text encoders run per prompt, not per row: they get the set's weights when the whole
        # group shares one set (which `mixes` ensures for adapters with text-encoder weights).
        same = all(loras == sets[0] for loras in sets)
        text = tuple((u.adapter_id, float(u.weight)) for u in sets[0]) if same else ()
        if text != self._active or loaded_any:
            self._set_slot_weights(text)
            self._active = text
        if not loaded_any:
            self.switch_s.append(time.perf_counter() - t0)
        return weights

    def activate(self, loras: tuple[LoraUse, ...]) -> None:
        if self.placeholders is not None:  # every row this set (a UNet call without per-row weights)
            assert self.rows is not None
            self.rows.uniform(self.activate_rows([loras])[0])
            return
        want = tuple((u.adapter_id, float(u.weight)) for u in loras)
        t0 = time.perf_counter()
        loaded_any = self._ensure([aid for aid, _ in want])
        if want == self._active and not loaded_any:
            return
        if not want:
            if self._loaded:
                self.pipeline.disable_lora()
        else:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([self._loaded[aid] for aid, _ in want], [w for _, w in want])
        self._active = want
        if not loaded_any:
            self.switch_s.append(time.perf_counter() - t0)

    def _set_slot_weights(self, want: tuple[tuple[str, float], ...]) -> None:
        """Placeholder slots: every slot active, in a fixed order, weight 0 unless the group uses it
        (never `disable_lora`/a changing active set: the compiled UNet guards on both). The text
        encoders keep these weights; the UNet's scales stay 1.0 (its weights are per row: lora_rows)."""
        assert self.placeholders is not None
        by_slot = {self._loaded[aid]: w for aid, w in want}
        slots = self.placeholders.slots
        self.pipeline.set_adapters(slots, [by_slot.get(slot, 0.0) for slot in slots])
        self.placeholders.keep_scales_as_tensors()

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
            sd = self._read(aid)
        slot = self._free_slot(keep)
        hotswap = self.placeholders is not None
        if hotswap:
            self._hotswap(sd, slot)
        else:  # load_lora_weights consumes (pops) the dict it is given: hand it a shallow copy.
            self.pipeline.load_lora_weights(dict(sd), adapter_name=slot)
        self._loaded[aid] = slot
        self._active = None
        self.loads += 1
        self.load_s.append(time.perf_counter() - t0)
        logger.info("adapter %s loaded into %s in %.3fs%s", aid, slot, self.load_s[-1], " (hotswap)" if hotswap else "")

    def _hotswap(self, sd: dict[str, torch.Tensor], slot: str) -> None:
        """Write an adapter into a placeholder slot: its UNet part in place (lora_slots.py, no new
        layers: nothing to recompile); its text-encoder part, if any, loaded the ordinary way (the
        text encoders are not compiled, and diffusers won't hot-swap them)."""
        assert self.placeholders is not None
        self._drop_text_encoder_part(slot)  # the slot's previous adapter's, if it wasn't unloaded
        self.placeholders.fill(slot, sd)
        text = {k: v for k, v in sd.items() if not k.startswith("unet.")}
        if text:
            self.pipeline.load_lora_weights(text, adapter_name=slot)

    def _drop_text_encoder_part(self, slot: str) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers

        delete_layers: Any = delete_adapter_layers  # untyped in diffusers
        for name in _TEXT_ENCODERS:
            encoder = getattr(self.pipeline, name, None)
            if encoder is not None and any(slot in getattr(m, "lora_A", ()) for m in encoder.modules()):
                delete_layers(encoder, slot)

    def _unload(self, aid: str) -> str:
        slot = self._loaded.pop(aid)
        if self.placeholders is not None:  # the slot keeps its UNet layers, back to the zero placeholder
            self.placeholders.clear(slot)
            self._drop_text_encoder_part(slot)
        else:
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
