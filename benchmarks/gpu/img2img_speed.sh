#!/usr/bin/env bash
# One device call: install diffusers (and the typed-config deps) from .gpuwhl/, then
# benchmarks/img2img_speed.py: img2img (strength 0.6) and inpainting vs txt2img images/s at 1024²,
# 30 steps, batch 1 and 4, full-size SDXL with random fp16 weights. .gpuwhl/ is git-ignored: the
# device call must name it, carry: [".gpuwhl"] (how to make it: benchmarks/gpu/engine_speed.sh).
#   usage: bash benchmarks/gpu/img2img_speed.sh NAME [img2img_speed args...]   (writes $OUT/NAME.json;
#   commit it as benchmarks/results/gpu/<card>-img2img_speed.json)
set -uo pipefail
name=$1; shift
source benchmarks/gpu/diffusers_env.sh
python3 -m benchmarks.img2img_speed --out "$OUT/$name.json" "$@" 2>&1 | grep -v "^W1207\|UserWarning\|warnings.warn"
