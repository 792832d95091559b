"""The LLM deployment's contract: one chat model's typed config (`llm_models[]` of the app's args),
bound to `LLMDeployment` as this object (as Ray's LLM server takes `LLMConfig`).

Defined here, beside the replica that reads it, and composed by `serve_app/config.py`; importing
it costs pydantic only, so an LLM replica loads nothing of the application (HTTP, tenancy, storage).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    aliases: list[str] = Field(default_factory=list)
    description: str = ""

    @model_validator(mode="after")
    def _check_engine_kwargs(self) -> LLMModelConfig:
        # The replica checks prompts against `max_model_len`; the same key in engine_kwargs would
        # give the engine another context than the one requests are checked against.
        if "max_model_len" in self.engine_kwargs:
            raise ValueError("engine_kwargs.max_model_len: set the model's own `max_model_len` field instead "
                             "(the replica checks prompt lengths against it and passes it to the engine)")
        return self

    @property
    def deployment_name(self) -> str:
        return f"LLM-{self.name}"
