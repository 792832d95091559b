"""The LLM deployment's contract: one chat model's typed config (`llm_models[]` of the app's args),
bound to `LLMDeployment` as this object (as Ray's LLM server takes `LLMConfig`).

Defined here, beside the replica that reads it, and composed by `serve_app/config.py`; importing
it costs pydantic only, so an LLM replica loads nothing of the application (HTTP, tenancy, storage).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# vLLM sizes its LoRA buffers by max_lora_rank and accepts only these values.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# engine_kwargs keys that `lora` owns (one place says how adapters are served).
_LORA_ENGINE_KEYS = {"enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras"}


class LoRAConfig(BaseModel):
    """Per-request LoRA adapters on this model (docs/llm.md, "LoRA adapters")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    max_adapters_per_replica: int = Field(
        8, ge=1, le=4096, description="Adapters one replica keeps loaded: Serve's multiplexing "
        "`max_num_models_per_replica` (least recently used evicted; requests for an adapter go to replicas "
        "that hold it). vLLM keeps as many in its CPU cache (`max_cpu_loras`).")
    max_loras: int = Field(
        4, ge=1, le=256, description="vLLM: distinct adapters in one batch (GPU slots). The transformers "
        "engine runs one adapter per batch whatever this says.")
    max_lora_rank: int = Field(
        16, description=f"Largest adapter rank the replica loads; vLLM sizes its buffers by it (one of {LORA_RANKS}).")

    @model_validator(mode="after")
    def _check(self) -> LoRAConfig:
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"lora.max_lora_rank must be one of {LORA_RANKS}, got {self.max_lora_rank}")
        if self.max_loras > self.max_adapters_per_replica:
            raise ValueError(f"lora.max_loras ({self.max_loras}) must be <= lora.max_adapters_per_replica "
                             f"({self.max_adapters_per_replica}): a batch can only use adapters the replica holds")
        return self

    def vllm_kwargs(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {"enable_lora": True, "max_loras": self.max_loras, "max_lora_rank": self.max_lora_rank,
                "max_cpu_loras": self.max_adapters_per_replica}


class LLMModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: str = Field(description="Hub id or local directory.")
    engine: Literal["vllm", "transformers", "auto"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int = Field(2048, ge=16, le=1_048_576)
    default_max_tokens: int = Field(256, ge=1)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to the engine as-is.")
    stream_interval_ms: float = Field(
        50.0, ge=0.0, le=1000.0, description="Streamed tokens after the first leave the replica in one message "
        "per interval (0: one per token). Each message costs the replica, ingress and proxy a round of Python; "
        "the first token is always sent at once.")
    stream_coalesce_above: int = Field(
        0, ge=0, description="Coalesce per `stream_interval_ms` only while more than this many streams are open "
        "on the replica; fewer get every token at once (0: always coalesce). On an H100 with vLLM, one message "
        "per token kept inter-token latency at the engine's up to 8 streams but cost ~half the throughput at 64 "
        "(benchmarks/README.md).")
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="vLLM tensor parallelism: GPUs one engine shards every layer over (one "
        "node, NVLink). Above 1 the replica holds no GPU itself; each engine worker gets a `{GPU: 1}` bundle of "
        "the replica's placement group (docs/multi-gpu.md).")
    pipeline_parallel_size: int = Field(
        1, ge=1, le=64, description="vLLM pipeline parallelism: stages of layers, one per GPU group (across "
        "nodes when one node's GPUs are not enough). GPUs per replica = tensor_parallel_size x this.")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement-group strategy of a multi-GPU replica's bundles (Ray's LLM server defaults "
        "to PACK: one node when possible). STRICT_PACK refuses to split a tensor-parallel engine over nodes.")
    replica_cpus: float = Field(
        1.0, gt=0, description="CPUs of a multi-GPU replica's actor, merged into its first bundle; a Serve config "
        "that sets this deployment's ray_actor_options.num_cpus must stay within it (Serve checks).")
    placement_label_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels every GPU bundle of a multi-GPU replica must match (e.g. "
        "{genserve.io/pool: gpu-llm}); a one-GPU replica uses ray_actor_options.label_selector instead.")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="Per-request LoRA adapters (off by default).")
    aliases: list[str] = Field(default_factory=list)
    description: str = ""

    @model_validator(mode="after")
    def _check_engine_kwargs(self) -> LLMModelConfig:
        # The replica checks prompts against `max_model_len`; the same key in engine_kwargs would
        # give the engine another context than the one requests are checked against.
        if "max_model_len" in self.engine_kwargs:
            raise ValueError("engine_kwargs.max_model_len: set the model's own `max_model_len` field instead "
                             "(the replica checks prompt lengths against it and passes it to the engine)")
        parallel = {"tensor_parallel_size", "pipeline_parallel_size"} & self.engine_kwargs.keys()
        if parallel:
            raise ValueError(f"engine_kwargs.{sorted(parallel)[0]}: set the model's own field of that name instead "
                             "(the graph sizes the replica's placement group from it)")
        lora_keys = _LORA_ENGINE_KEYS & self.engine_kwargs.keys()
        if lora_keys:
            raise ValueError(f"engine_kwargs.{sorted(lora_keys)[0]}: set the model's `lora` block instead "
                             "(lora.enabled, lora.max_loras, lora.max_lora_rank, lora.max_adapters_per_replica)")
        if self.num_gpus_per_replica > 1:
            if self.engine != "vllm":
                raise ValueError(f"tensor_parallel_size ({self.tensor_parallel_size}) x pipeline_parallel_size "
                                 f"({self.pipeline_parallel_size}) > 1 needs engine: vllm (engine is {self.engine!r})")
            backend = self.engine_kwargs.get("distributed_executor_backend", "ray")
            if backend != "ray":
                raise ValueError(f"engine_kwargs.distributed_executor_backend: {backend!r} can't use the GPUs of the "
                                 "replica's placement group; a multi-GPU engine runs its workers as Ray actors "
                                 "('ray', the default here)")
        return self

    @property
    def num_gpus_per_replica(self) -> int:
        """GPUs one engine spans (1: the Serve config's ray_actor_options.num_gpus places it)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def resolved_engine_kwargs(self, kind: str = "vllm") -> dict[str, Any]:
        """`engine_kwargs` plus the parallelism of a multi-GPU engine and, for `kind` vllm, the LoRA
        settings (vLLM's names; the transformers engine loads adapters without any)."""
        kwargs = dict(self.engine_kwargs)
        if kind == "vllm":
            kwargs.update(self.lora.vllm_kwargs())
        if self.num_gpus_per_replica > 1:
            kwargs.update(tensor_parallel_size=self.tensor_parallel_size,
                          pipeline_parallel_size=self.pipeline_parallel_size, distributed_executor_backend="ray")
        return kwargs

    def deployment_options(self) -> dict[str, Any]:
        """Serve options of a multi-GPU replica (placement group of one GPU bundle per engine worker, as
        Ray's LLM server builds them); {} for one GPU or none, which the Serve config's
        ray_actor_options place."""
        if self.num_gpus_per_replica == 1:
            return {}
        from deployments.placement import multi_gpu_options

        return multi_gpu_options(self.num_gpus_per_replica, replica_cpus=self.replica_cpus,
                                 strategy=self.placement_strategy, label_selector=self.placement_label_selector)

    @property
    def deployment_name(self) -> str:
        return f"LLM-{self.name}"
