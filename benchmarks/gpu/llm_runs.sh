#!/usr/bin/env bash
# On the GPU host after `source .devwhl-b/install.sh` (../shared/gpu-host/README.md): the LLM
# through the graph vs the engine, behind Serve's proxy and behind HAProxy (Ray's direct ingress).
#   bash benchmarks/gpu/llm_runs.sh OUT_DIR [scheduler] [variants] ["more llm_overhead args"]
set -uo pipefail
out=${1:?OUT_DIR}; scheduler=${2:-continuous}; variants=${3:-proxy,haproxy}; extra=(${4:-})
export RAY_TMPDIR=/tmp/r PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
mkdir -p "$RAY_TMPDIR"; tag=${5:-}
common=(--full --concurrency 1,4 --requests 4 --rounds 3 --max-tokens 128 --scheduler "$scheduler" "${extra[@]}")
for v in ${variants//,/ }; do
  case $v in
    proxy) env=() ;;
    haproxy) env=(RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1) ;;
  esac
  env "${env[@]}" python3 -m benchmarks.llm_overhead "${common[@]}" --out "$out/llm-$v-$scheduler$tag.json" \
    > "$out/llm-$v-$scheduler$tag.log" 2>&1
  grep -E '^\{"tok' "$out/llm-$v-$scheduler$tag.log"; ray stop --force >/dev/null 2>&1
done
