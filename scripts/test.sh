#!/usr/bin/env bash
# The whole suite. Ray, vLLM and torch caches stay inside the work dir, not in /tmp or ~.
set -euo pipefail
cd "$(dirname "$0")/.."
export GENSERVE_WORK="${GENSERVE_WORK:-$PWD/.work}"
# Ray's socket paths must stay under ~107 bytes: fall back to a short private dir.
ray_dir="$GENSERVE_WORK/ray"; [ ${#ray_dir} -le 40 ] || ray_dir=$(mktemp -d /tmp/gsray.XXXX)
export RAY_TMPDIR="${RAY_TMPDIR:-$ray_dir}"
export VLLM_CACHE_ROOT="$GENSERVE_WORK/cache/vllm" TORCHINDUCTOR_CACHE_DIR="$GENSERVE_WORK/cache/inductor"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
mkdir -p "$RAY_TMPDIR" tests/artifacts
exec .venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
