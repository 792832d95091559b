#!/usr/bin/env bash
# One device call: install diffusers (+ torchao if the host lacks it) from .gpuwhl/, then
# benchmarks/engine_speed.py. .gpuwhl/ is never committed (untracked files travel with a device
# call; if you git-ignore it, pass carry: [".gpuwhl"]); make it with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .gpuwhl diffusers==0.42.1 importlib_metadata torchao==0.18.0
#   usage: bash benchmarks/gpu/engine_speed.sh NAME [engine_speed args...]   (writes $OUT/NAME.json)
set -uo pipefail
name=$1; shift
echo "host torchao: $(python3 -c 'import torchao; print(torchao.__version__)' 2>&1 | tail -1)"
whl=(.gpuwhl/diffusers-*.whl .gpuwhl/importlib_metadata-*.whl)
python3 -c 'import torchao' 2>/dev/null || whl+=(.gpuwhl/torchao-*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${whl[@]}" 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD GENSERVE_WORK=/tmp/gw
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -m benchmarks.engine_speed --out "$OUT/$name.json" "$@" 2>&1 | grep -v "^W1207\|UserWarning\|warnings.warn"
du -sh /tmp/gw/compile-cache 2>/dev/null
