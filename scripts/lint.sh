#!/usr/bin/env bash
# Lint gate of `make test` (settings in pyproject.toml): ruff on every Python file, mypy --strict on
# the model-side contracts (the typed configs, request/result types, rules and the small shared
# modules the ingress and the replicas both rely on, and the replicas' servers and deployments), mypy on
# the whole deployments and telemetry packages. Add a module to STRICT once it passes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STRICT=(
  deployments/placement.py deployments/adapters.py
  deployments/diffusion/config.py deployments/diffusion/rules.py deployments/diffusion/types.py
  deployments/diffusion/buckets.py deployments/diffusion/progress.py
  deployments/llm/config.py deployments/llm/types.py deployments/llm/sequence.py
  deployments/llm/share_clock.py deployments/llm/coalesce.py
  deployments/diffusion/server.py deployments/diffusion/deployment.py deployments/diffusion/loading.py
  deployments/diffusion/sdxl.py deployments/diffusion/img2img.py deployments/diffusion/ip_adapter.py deployments/diffusion/lora.py deployments/diffusion/lora_slots.py deployments/diffusion/lora_fused.py deployments/diffusion/lora_rows.py
  deployments/diffusion/previews.py serve_app/images/streaming.py serve_app/jobs/previews.py
  deployments/llm/server.py deployments/llm/deployment.py deployments/llm/engine.py deployments/llm/loading.py
  deployments/llm/vllm_engine.py deployments/llm/adapters.py deployments/llm/peft_adapters.py
  telemetry/metrics.py telemetry/tracing.py
  serve_app/images/inputs.py serve_app/images/config.py serve_app/images/conditioning.py serve_app/images/edits.py
  serve_app/files/protocol.py serve_app/files/store.py serve_app/files/router.py
  serve_app/adapters/types.py serve_app/adapters/config.py serve_app/adapters/archive.py serve_app/adapters/source.py
  serve_app/adapters/models.py serve_app/adapters/registry.py serve_app/adapters/protocol.py serve_app/adapters/router.py
  serve_app/adapters/cli.py
)
"$PY" -m ruff check .
# follow-imports=silent: judge these files strictly, not everything they import.
"$PY" -m mypy --strict --follow-imports=silent "${STRICT[@]}"
# Everything else: the default (non-strict) checks over the whole packages, so new code in any
# module is type-checked too (pyproject's [tool.mypy]: pydantic plugin, warn_unused_ignores).
"$PY" -m mypy deployments telemetry
