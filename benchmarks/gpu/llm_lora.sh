#!/usr/bin/env bash
# On the GPU host after installing the staged vLLM 0.26 (../shared/gpu-host/README.md, stage-vllm.sh):
# LLM LoRA cost on one replica, Llama-3.1-8B shape with dummy weights, 20 random adapters (Zipf
# traffic) vs no adapters, same run (benchmarks/llm_lora.py). One JSON per rank.
#   bash benchmarks/gpu/llm_lora.sh OUT_DIR [card-tag] ["more llm_lora args"]
# e.g. bash benchmarks/gpu/llm_lora.sh benchmarks/results/gpu h100
set -uo pipefail
out=${1:?OUT_DIR}; tag=${2:-gpu}; extra=(${3:-})
# vLLM 0.26 as staged has no flashinfer: its default sampler would import it (TRAPS.md).
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export GENSERVE_WORK=${GENSERVE_WORK:-/tmp/genserve-work}
mkdir -p "$out" "$GENSERVE_WORK"
for rank in 16 32; do
  # Output to a file, never a pipe: vLLM's engine-core child inherits stdout (TRAPS.md).
  python3 -m benchmarks.llm_lora --shape 8b --engine vllm --adapters 20 --rank "$rank" --max-lora-rank 32 \
    --max-loras 4 --requests 512 --concurrency 32 --max-tokens 128 "${extra[@]}" \
    --out "$out/llm_lora-r$rank-$tag.json" > "$out/llm_lora-r$rank-$tag.log" 2>&1
  echo "rank $rank: exit $?"; tail -n 1 "$out/llm_lora-r$rank-$tag.log"
done
