"""The engine protocol the LLM deployment drives, and the factory that picks one from config.

An engine turns prompt token ids into a stream of `TokenDelta`s for one sequence: it runs the
model (vLLM or transformers) and knows nothing of Ray or Serve. Chat templating, `n`, request
validation and usage live above it (`LLMServer`, deployments/llm/server.py, with prompt.py), so
both engines share them and count tokens the same way.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from deployments.llm.config import LLMModelConfig
from deployments.llm.types import LoRAAdapter, SamplingParams, TokenDelta

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("genserve.llm")


@runtime_checkable
class LLMEngine(Protocol):
    name: str  # "vllm" | "transformers"
    max_model_len: int

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    async def start(self) -> None:
        """Load the model; called once before any generate()."""

    def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, adapter: str | None = None
    ) -> AsyncGenerator[TokenDelta, None]:
        """Stream one sequence, with the loaded LoRA adapter of that id (None: the base model).
        Closing the iterator early (cancel, aclose) aborts it."""
        ...

    async def load_adapter(self, adapter: LoRAAdapter) -> None:
        """Load a LoRA adapter (PEFT directory) under `adapter.id`; a no-op if it is loaded.
        `LLMServer` (adapters.py) decides when, and unloads only adapters no sequence uses."""

    async def unload_adapter(self, adapter_id: str) -> None:
        """Free a loaded adapter; a no-op if it is not loaded."""

    async def abort(self, request_id: str) -> None:
        """Stop a running sequence; its stream ends with finish_reason "abort"."""

    def num_running(self) -> int:
        """Sequences the engine is decoding right now (aborted ones leave at their next step)."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine can't serve (Serve restarts the replica)."""

    async def shutdown(self) -> None: ...


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine_kind(kind: str) -> str:
    if kind == "auto":
        return "vllm" if vllm_available() else "transformers"
    if kind == "vllm" and not vllm_available():
        raise RuntimeError(
            "engine 'vllm' was asked for but vllm is not importable in this environment "
            "(install the `vllm` extra, or set engine: transformers | auto)"
        )
    if kind not in ("vllm", "transformers"):
        raise ValueError(f"engine must be vllm, transformers or auto, got {kind!r}")
    return kind


def build_engine(
    model: str,
    *,
    engine: str = "auto",
    max_model_len: int = 2048,
    dtype: str = "auto",
    device: str = "auto",
    engine_kwargs: dict[str, Any] | None = None,
) -> LLMEngine:
    """Build (not start) the engine a model config asks for."""
    kind = resolve_engine_kind(engine)
    kwargs = dict(engine_kwargs or {})
    if kind == "vllm":
        from deployments.llm.vllm_engine import VLLMEngine

        return VLLMEngine(model, max_model_len=max_model_len, dtype=dtype, device=device, **kwargs)
    from deployments.llm.transformers_engine import TransformersEngine

    return TransformersEngine(model, max_model_len=max_model_len, dtype=dtype, device=device, **kwargs)


def engine_for(config: LLMModelConfig, *, work_dir: str | Path | None = None) -> LLMEngine:
    """Build (not start) the engine of one model's config; vLLM's caches go inside `work_dir`."""
    kind = resolve_engine_kind(config.engine)
    kwargs = config.resolved_engine_kwargs(kind)  # + tensor/pipeline parallel sizes, vLLM's LoRA settings
    if work_dir is not None and kind == "vllm":  # vLLM/inductor caches inside the work dir
        kwargs.setdefault("cache_dir", str(Path(work_dir) / "cache"))
    return build_engine(config.model, engine=kind, max_model_len=config.max_model_len, dtype=config.dtype,
                        device=config.device, engine_kwargs=kwargs)
