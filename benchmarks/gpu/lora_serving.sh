#!/usr/bin/env bash
# One device call: install diffusers + peft (+ pydantic) from .gpuwhl/, then benchmarks/lora_serving.py.
# .gpuwhl/ is git-ignored (not committed): the device call must name it, carry: [".gpuwhl"]. The GPU
# host has no peft: besides engine_speed.sh's wheels, stage peft (pure Python; its deps torch,
# transformers, accelerate, safetensors, huggingface_hub, packaging, psutil, pyyaml, tqdm, numpy are
# on the host, or add accelerate if `import accelerate` fails there):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .gpuwhl diffusers==0.42.1 importlib_metadata peft==0.21.2 \
#     accelerate pydantic==2.13.5 pydantic_core==2.46.5 annotated_types typing_inspection typing_extensions
#   usage: bash benchmarks/gpu/lora_serving.sh NAME [lora_serving args...]   (writes $OUT/NAME.json)
set -uo pipefail
name=$1; shift
whl=(.gpuwhl/diffusers-*.whl .gpuwhl/importlib_metadata-*.whl .gpuwhl/peft-*.whl .gpuwhl/pydantic-*.whl
     .gpuwhl/pydantic_core-*.whl .gpuwhl/annotated_types-*.whl .gpuwhl/typing_inspection-*.whl
     .gpuwhl/typing_extensions-*.whl)
python3 -c 'import accelerate' 2>/dev/null || whl+=(.gpuwhl/accelerate-*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${whl[@]}" 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD GENSERVE_WORK=/tmp/gw
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -m benchmarks.lora_serving --out "$OUT/$name.json" "$@" 2>&1 | grep -v "^W1207\|UserWarning\|warnings.warn"
# Commit the result as benchmarks/results/gpu/lora_serving_<card>.json (the lead copies it from $OUT).
