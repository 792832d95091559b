#!/usr/bin/env bash
# One device call: install diffusers (+ pydantic for the typed configs) from .gpuwhl/, then
# benchmarks/partial_images.py: images/s with 3 partial images per image vs none, same run (full-size
# SDXL random weights fp16, 1024², 30 steps, batch 4; a random TAESD-XL-shaped preview decoder).
# .gpuwhl/ is git-ignored: the device call must carry it (carry: [".gpuwhl"]); make it as
# benchmarks/gpu/engine_speed.sh says.
#   usage: bash benchmarks/gpu/partial_images.sh NAME [partial_images args...]   (writes $OUT/NAME.json)
#   then:  cp $files_at/NAME.json benchmarks/results/gpu/
set -uo pipefail
name=$1; shift
source benchmarks/gpu/diffusers_env.sh
python3 -m benchmarks.partial_images --out "$OUT/$name.json" --reps 5 "$@" 2>&1 | grep -v "^W1207\|UserWarning\|warnings.warn"
