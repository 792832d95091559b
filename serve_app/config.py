"""Typed configuration of the genserve application: the `args` of the Serve config.

`serve deploy configs/serve.yaml` hands `applications[].args` to `serve_app.graph:build_app`,
which validates them here before anything starts. Errors name the field and the value.
Each deployment's model config is its own contract, defined in its package
(deployments/diffusion/config.py, deployments/llm/config.py) and composed here (re-exported, so
the application imports every config from this module). Serve's own per-deployment options
(replicas, autoscaling, GPUs, max_ongoing_requests) stay in the Serve config's `deployments:`
section, where Ray documents and validates them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.diffusion.config import AdaptiveQualityConfig, BatchingConfig, DiffusionModelConfig, OptimizeConfig
from deployments.llm.config import LLMModelConfig
from serve_app.adapters.config import AdaptersConfig
from serve_app.jobs.config import JobsConfig
from serve_app.storage.config import StorageConfig
from serve_app.tenancy.config import TenancyConfig
from telemetry.config import TelemetryConfig

__all__ = ["AdaptiveQualityConfig", "AppConfig", "BatchingConfig", "DiffusionModelConfig", "LLMModelConfig",
           "LimitsConfig", "OptimizeConfig", "PromptTemplateConfig", "expand_env", "load_app_config",
           "load_serve_config_file"]

DEFAULT_PUBLIC_BASE_URL = "http://127.0.0.1:8000"  # Serve's default http_options


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    adapters: AdaptersConfig = Field(default_factory=AdaptersConfig)
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
    def _check_names(self) -> AppConfig:
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
        names = {m.name for m in [*self.diffusion_models, *self.llm_models]}
        unpriced = sorted(set(self.tenancy.gpu_cost.usd_per_gpu_hour) - names)
        if unpriced:  # the ledger records canonical names: an alias here would never match
            raise ValueError(f"tenancy.gpu_cost.usd_per_gpu_hour names unknown model(s) {unpriced} "
                             f"(model names, not aliases: {sorted(names)})")
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
