#!/usr/bin/env bash
# One device call: install diffusers (+ torchao if the host lacks it) from .gpuwhl/, then
# benchmarks/engine_speed.py. .gpuwhl/ is git-ignored (not committed): the device call must name it,
# carry: [".gpuwhl"]. Make it with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .gpuwhl diffusers==0.42.1 importlib_metadata torchao==0.18.0 \
#     pydantic==2.13.5 pydantic_core==2.46.5 annotated_types typing_inspection typing_extensions
#   usage: bash benchmarks/gpu/engine_speed.sh NAME [engine_speed args...]   (writes $OUT/NAME.json)
set -uo pipefail
name=$1; shift
# pydantic (+ its core and helpers) for the typed configs: the host has none.
source benchmarks/gpu/diffusers_env.sh
python3 -m benchmarks.engine_speed --out "$OUT/$name.json" "$@" 2>&1 | grep -v "^W1207\|UserWarning\|warnings.warn"
du -sh /tmp/gw/compile-cache 2>/dev/null
