#!/usr/bin/env bash
# On the GPU host after the Ray pieces are installed (`source .devwhl-b/install.sh`, see
# ../shared/gpu-host/README.md): benchmarks/lora_serving.py runs the replica's own DiffusionServer,
# which imports Ray (placement) and OpenTelemetry (telemetry), so .gpuwhl/ alone is not enough.
# The image (KINDS.md) has peft and accelerate; diffusers and pydantic come with .devwhl-b.
#   usage: bash benchmarks/gpu/lora_serving.sh NAME [lora_serving args...]   (writes $OUT/NAME.json)
set -uo pipefail
name=$1; shift
export PYTHONPATH=/tmp/site:$PWD GENSERVE_WORK=/tmp/gw
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -m benchmarks.lora_serving --out "$OUT/$name.json" "$@" 2>&1 | grep -v "^W1207\|UserWarning\|warnings.warn"
# Commit the result as benchmarks/results/gpu/lora_serving_<card>.json (the lead copies it from $OUT).
