"""LoRA adapters on the transformers engine's model, through transformers' PEFT integration.

Used by the continuous batcher's model thread only (loading injects LoRA layers into the modules
the decode step runs, so it must happen between steps). One adapter (or none) is active at a
time: the batcher runs one adapter per batch and activates the next when a batch drains. vLLM
mixes adapters inside a batch (vllm_engine.py); this fallback does not try to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

_UNKNOWN = object()  # the model's active adapter is not known (after a load or an unload)


def _no_reply(error: str | None) -> None:
    return None


@dataclass
class AdapterCommand:
    """Work for the model thread: load or unload one adapter. `done(error)` is called on that
    thread once it ran (error None: it worked). An unload waits while a sequence uses the adapter."""

    op: Literal["load", "unload"]
    adapter_id: str
    path: str = ""
    done: Callable[[str | None], None] = field(default=_no_reply)


def peft_name(adapter_id: str) -> str:
    """The PEFT adapter name of an adapter id: module-dict keys can't hold "." (ids may)."""
    return "lora_" + hashlib.sha256(adapter_id.encode()).hexdigest()[:24]


class PeftAdapters:
    """The adapters loaded on one model and which one is active."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.loaded: set[str] = set()
        self._active: object = None  # None: the base model (no adapter loaded yet)

    def load(self, adapter_id: str, path: str) -> None:
        if adapter_id in self.loaded:
            return
        # hotswap off: each adapter gets its own weights (hot-swapping replaces another's in place).
        self.model.load_adapter(path, adapter_name=peft_name(adapter_id), hotswap=False)
        self.loaded.add(adapter_id)
        self._active = _UNKNOWN  # loading may have made the new adapter the active one

    def unload(self, adapter_id: str) -> None:
        if adapter_id not in self.loaded:
            return
        self.model.delete_adapter(peft_name(adapter_id))
        self.loaded.discard(adapter_id)
        self._active = _UNKNOWN if self.loaded else None  # none left: the LoRA layers are gone

    def activate(self, adapter_id: str | None) -> None:
        """Run the next forward passes with this adapter (None: the base model)."""
        if adapter_id is not None and adapter_id not in self.loaded:
            raise KeyError(f"LoRA adapter {adapter_id!r} is not loaded on this replica")
        if adapter_id == self._active or not self.loaded:
            return
        if adapter_id is None:
            self.model.disable_adapters()
        else:
            self.model.set_adapter(peft_name(adapter_id))
            self.model.enable_adapters()
        self._active = adapter_id

    def run(self, cmd: AdapterCommand) -> str | None:
        """Run one command; its error as text (None: it worked)."""
        try:
            if cmd.op == "load":
                self.load(cmd.adapter_id, cmd.path)
            else:
                self.unload(cmd.adapter_id)
        except Exception as exc:  # a bad adapter fails its load, not the engine
            return f"{type(exc).__name__}: {exc}"
        return None
