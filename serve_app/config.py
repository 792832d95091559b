"""Typed configuration of the genserve application: the `args` of the Serve config.

`serve deploy configs/serve.yaml` hands `applications[].args` to `serve_app.graph:build_app`,
which validates them here before anything starts. Errors name the field and the value.
Serve's own per-deployment options (replicas, autoscaling, GPUs, max_ongoing_requests) stay in
the Serve config's `deployments:` section, where Ray documents and validates them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.jobs.config import JobsConfig
from serve_app.storage.config import StorageConfig
from serve_app.telemetry.config import TelemetryConfig
from serve_app.tenancy.config import TenancyConfig


DEFAULT_PUBLIC_BASE_URL = "http://127.0.0.1:8000"  # Serve's default http_options


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(_Strict):
    max_batch_size: int = Field(8, ge=1, le=128, description="Images per denoising call.")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0.0, le=10.0, description="How long a partial batch waits for more requests."
    )
    max_batch_megapixels: float | None = Field(
        None, gt=0.0, le=1000.0, description="Most pixels one batch may hold (sum over its images, in "
        "megapixels): the replica's GPU memory cap. The batcher closes a batch before it would exceed this, "
        "the ingress refuses (422) an image larger than it, and on CUDA the replica runs this worst case once "
        "at start. None: max_batch_size images at the model's native resolution.")
    priority_aging_s: float = Field(
        10.0, gt=0.0, le=3600.0, description="Plan priority aging: each second waited adds 1/aging_s to "
        "an image's priority, so a low plan waits at most ~aging_s x priority gap (docs/priority-and-quality.md).")


class AdaptiveQualityConfig(_Strict):
    """Fewer steps under load for requests that allow it (deployments/diffusion/quality.py).
    Load = (images queued + running on the replica) / max_batch_size."""

    enabled: bool = False
    high_water: float = Field(1.5, ge=0.0, description="Degrade when load exceeds this.")
    low_water: float = Field(0.5, ge=0.0, description="Restore once load stays at or below this for hold_s.")
    hold_s: float = Field(5.0, ge=0.0, le=600.0)
    min_steps_fraction: float = Field(0.5, gt=0.0, le=1.0, description="Degraded steps = ceil(steps x this).")
    min_steps: int = Field(1, ge=1, le=200, description="Never fewer steps than this.")

    @model_validator(mode="after")
    def _check_marks(self) -> "AdaptiveQualityConfig":
        if self.low_water > self.high_water:
            raise ValueError(f"low_water ({self.low_water}) must be <= high_water ({self.high_water})")
        return self


class OptimizeConfig(_Strict):
    """Pipeline speed-ups (deployments/diffusion/optimize.py). Eager is the default: compiling costs
    minutes per shape at replica start."""

    compile: Literal["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "none"
    channels_last: bool = False
    fuse_qkv: bool = False


class DiffusionModelConfig(_Strict):
    name: str = Field(description="Public model name (the `model` field of requests).")
    family: Literal["sdxl", "wuerstchen"]
    model: str = Field(description="Hub id or local directory, loaded with from_pretrained.")
    aliases: list[str] = Field(default_factory=list, description="Other names, e.g. `v6` for `--v 6`.")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    variant: str | None = None
    native_resolution: int = Field(1024, ge=8, le=4096, description="Side of the native square size.")
    size_multiple: int = Field(64, ge=8, le=128, description="Width/height are snapped to this.")
    max_side: int = Field(1536, ge=8, le=8192)
    min_side: int = Field(64, ge=8, le=4096)
    default_steps: int = Field(30, ge=1, le=200)
    max_steps: int = Field(80, ge=1, le=500)
    default_guidance: float = Field(5.0, ge=0.0, le=50.0)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    batch_invariant: bool | None = Field(
        None, description="Run the heavy models once per image so a seed gives the same pixels alone or "
        "in a batch (CPU kernels change with batch size). None = on for CPU, off for CUDA.")
    decoder_steps: int = Field(12, ge=1, le=100, description="Würstchen decoder steps (task steps are the prior's).")
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    adaptive_quality: AdaptiveQualityConfig = Field(default_factory=AdaptiveQualityConfig)
    vae_slicing: bool = Field(
        True, description="SDXL: decode a batch's latents one image at a time. The VAE decode of a whole "
        "batch is the memory peak at large sizes; slicing cuts it at a small cost (benchmarks/README.md).")
    probe_memory: bool = Field(
        True, description="On CUDA, run the largest batch the limits allow (1 step) when the replica starts, "
        "so a budget that does not fit the replica's GPU share fails the deploy instead of a request later.")
    description: str = ""

    @model_validator(mode="after")
    def _check_sizes(self) -> "DiffusionModelConfig":
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be <= max_side ({self.max_side})")
        if self.native_resolution % self.size_multiple:
            raise ValueError(
                f"native_resolution ({self.native_resolution}) must be a multiple of "
                f"size_multiple ({self.size_multiple})"
            )
        if self.native_resolution**2 / 1e6 > self.batch_megapixels:
            raise ValueError(f"batching.max_batch_megapixels ({self.batch_megapixels:g}) is smaller than one image at "
                             f"the native resolution ({self.native_resolution}px): every default request would be refused")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) must be <= max_steps ({self.max_steps})")
        return self

    @property
    def deployment_name(self) -> str:
        return f"Diffusion-{self.name}"

    @property
    def batch_megapixels(self) -> float:
        """The batch pixel budget in megapixels (see `BatchingConfig.max_batch_megapixels`)."""
        if self.batching.max_batch_megapixels is not None:
            return self.batching.max_batch_megapixels
        return self.batching.max_batch_size * self.native_resolution**2 / 1e6


class LLMModelConfig(_Strict):
    name: str
    model: str = Field(description="Hub id or local directory.")
    engine: Literal["vllm", "transformers", "auto"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int = Field(2048, ge=16, le=1_048_576)
    default_max_tokens: int = Field(256, ge=1)
    engine_kwargs: dict = Field(default_factory=dict, description="Passed to the engine as-is.")
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
    def _check_engine_kwargs(self) -> "LLMModelConfig":
        # The replica checks prompts against `max_model_len`; the same key in engine_kwargs would
        # give the engine another context than the one requests are checked against.
        if "max_model_len" in self.engine_kwargs:
            raise ValueError("engine_kwargs.max_model_len: set the model's own `max_model_len` field instead "
                             "(the replica checks prompt lengths against it and passes it to the engine)")
        return self

    @property
    def deployment_name(self) -> str:
        return f"LLM-{self.name}"


class PromptTemplateConfig(_Strict):
    """A template defined in config (the template library adds stored, versioned ones)."""

    name: str
    template: str
    category: str = "general"
    defaults: str = Field("", description="Default parameters appended to the prompt, e.g. `--ar 16:9`.")


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Larger bodies get 413.")
    max_prompt_chars: int = Field(4000, ge=1)
    max_images_per_request: int = Field(10, ge=1, le=100)


class AppConfig(_Strict):
    """Everything the application needs, from the Serve config's `args`."""

    diffusion_models: list[DiffusionModelConfig] = Field(min_length=1)
    llm_models: list[LLMModelConfig] = Field(default_factory=list)
    default_image_model: str | None = None
    enhance_model: str | None = Field(
        None, description="The chat model (name or alias) that expands prompts for `enhance` on images and "
        "jobs. None: the first of llm_models.")
    templates: list[PromptTemplateConfig] = Field(default_factory=list)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    tenancy: TenancyConfig = Field(default_factory=TenancyConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    work_dir: Path = Field(Path(".work"), description="Databases, results and caches (relative to cwd).")
    public_base_url: str = Field(
        DEFAULT_PUBLIC_BASE_URL, description="The origin clients reach this app at, e.g. https://api.example.com: "
        "result and webhook-payload URLs are built from it, never from the request's Host header. Default: "
        "Serve's bind address (`genserve run` and the launcher fill in the configured http_options); production "
        "configs must set it (configs/serve.yaml: env GENSERVE_PUBLIC_BASE_URL).")
    trusted_hosts: list[str] | None = Field(
        None, description="If set, requests whose Host header is not listed get 400 (Starlette's "
        "TrustedHostMiddleware; `*.example.com` wildcards). None: any Host is served (it is never used for URLs).")

    @field_validator("public_base_url", mode="before")
    @classmethod
    def _check_public_base_url(cls, v: object) -> object:
        if isinstance(v, str):
            if not v.strip():  # `${GENSERVE_PUBLIC_BASE_URL}` unset in the environment
                raise ValueError("public_base_url is empty: set it (env GENSERVE_PUBLIC_BASE_URL in configs/serve.yaml) "
                                 "to the origin clients use, e.g. https://api.example.com")
            parts = urlsplit(v.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
                raise ValueError(f"public_base_url ({v!r}) must be an http(s) origin with an optional path, "
                                 "e.g. https://api.example.com")
            return v.strip().rstrip("/")
        return v

    @model_validator(mode="after")
    def _check_names(self) -> "AppConfig":
        seen: dict[str, str] = {}
        for m in [*self.diffusion_models, *self.llm_models]:
            for n in [m.name, *m.aliases]:
                if n in seen:
                    raise ValueError(f"model name or alias {n!r} is used twice ({seen[n]!r} and {m.name!r})")
                seen[n] = m.name
        if self.default_image_model is not None and self.default_image_model not in {
            m.name for m in self.diffusion_models
        }:
            raise ValueError(
                f"default_image_model ({self.default_image_model!r}) is not one of diffusion_models "
                f"({[m.name for m in self.diffusion_models]})"
            )
        if self.enhance_model is not None and self.find_llm(self.enhance_model) is None:
            raise ValueError(f"enhance_model ({self.enhance_model!r}) is not one of llm_models "
                             f"({[m.name for m in self.llm_models]})")
        known = set(seen)
        for plan in self.tenancy.plans:
            if plan.allowed_models != "*":
                unknown = sorted(set(plan.allowed_models) - known)
                if unknown:
                    raise ValueError(f"plan {plan.name!r} allows unknown model(s) {unknown} (known: {sorted(known)})")
        return self

    @property
    def image_model_default(self) -> str:
        return self.default_image_model or self.diffusion_models[0].name

    @property
    def enhance_llm(self) -> LLMModelConfig | None:
        """The chat model `enhance` uses (None: no LLM configured, enhance answers 404)."""
        if self.enhance_model is not None:
            return self.find_llm(self.enhance_model)
        return self.llm_models[0] if self.llm_models else None

    def find_diffusion(self, name: str) -> DiffusionModelConfig | None:
        for m in self.diffusion_models:
            if name == m.name or name in m.aliases:
                return m
        return None

    def find_llm(self, name: str) -> LLMModelConfig | None:
        for m in self.llm_models:
            if name == m.name or name in m.aliases:
                return m
        return None


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str) -> str:
    """`${VAR}` and `${VAR:-default}` from the environment (the Serve config is static YAML)."""
    return _VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


def _expand_tree(value: Any) -> Any:
    if isinstance(value, str):
        return expand_env(value)
    if isinstance(value, dict):
        return {k: _expand_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_tree(v) for v in value]
    return value


def _absolutize(model: str) -> str:
    # A hub id ("org/name") stays as is; a local path becomes absolute so replicas, whose
    # working directory is Ray's, find it.
    if model.startswith((".", "/", "~")) or os.path.exists(model):
        return str(Path(model).expanduser().resolve())
    return model


def load_app_config(args: dict[str, Any] | AppConfig) -> AppConfig:
    """Validate the Serve config's `args` (env vars expanded, local paths made absolute)."""
    if isinstance(args, AppConfig):
        return args
    cfg = AppConfig.model_validate(_expand_tree(dict(args or {})))
    return cfg.model_copy(update={
        "work_dir": cfg.work_dir.expanduser().resolve(),
        "diffusion_models": [m.model_copy(update={"model": _absolutize(m.model)}) for m in cfg.diffusion_models],
        "llm_models": [m.model_copy(update={"model": _absolutize(m.model)}) for m in cfg.llm_models],
    })


def load_serve_config_file(path: str | Path, app_index: int = 0) -> tuple[dict, AppConfig]:
    """Read a Serve YAML: (the whole document, the typed args of one application)."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    apps = doc.get("applications") or []
    if not apps:
        raise ValueError(f"{path}: no `applications` in the Serve config")
    return doc, load_app_config(apps[app_index].get("args") or {})
