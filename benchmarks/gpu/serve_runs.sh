#!/usr/bin/env bash
# On the GPU host after `source .devwhl-b/install.sh`: the image graph over HTTP vs the raw
# pipeline (serving_suite's serve phase) behind Serve's proxy and behind HAProxy.
#   bash benchmarks/gpu/serve_runs.sh OUT_DIR [variants]
set -uo pipefail
out=${1:?OUT_DIR}; variants=${2:-proxy,haproxy}
export RAY_TMPDIR=/tmp/r PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
mkdir -p "$RAY_TMPDIR"
for v in ${variants//,/ }; do
  case $v in
    proxy) env=() ;;
    haproxy) env=(RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1) ;;
  esac
  env "${env[@]}" python3 -m benchmarks.serving_suite --phases serve --name "serve-$v" --out "$out" \
    > "$out/serve-$v.log" 2>&1
  grep -E '"ratio_graph_over_raw"|"images_per_s"' "$out/serve-$v.log" | tail -4; ray stop --force >/dev/null 2>&1
done
