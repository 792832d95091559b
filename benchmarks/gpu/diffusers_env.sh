# Sourced by the one-call GPU benchmark scripts (engine_speed.sh, img2img_speed.sh, partial_images.sh):
# installs diffusers and the typed-config deps from .gpuwhl/ (git-ignored; the
# device call must carry it: carry: [".gpuwhl"]; how to make it: engine_speed.sh) into /tmp/site,
# plus torchao/accelerate where the host lacks them; sets PYTHONPATH and
# GENSERVE_WORK, and prints the card.
whl=(.gpuwhl/diffusers-*.whl .gpuwhl/importlib_metadata-*.whl .gpuwhl/pydantic-*.whl .gpuwhl/pydantic_core-*.whl
     .gpuwhl/annotated_types-*.whl .gpuwhl/typing_inspection-*.whl .gpuwhl/typing_extensions-*.whl)
python3 -c 'import torchao' 2>/dev/null || whl+=(.gpuwhl/torchao-*.whl)
python3 -c 'import accelerate' 2>/dev/null || whl+=(.gpuwhl/accelerate-*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${whl[@]}" 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD GENSERVE_WORK=/tmp/gw
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
