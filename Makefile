# Two commands on a fresh machine:  `make run`  (serve the tiny models on CPU)  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export GENSERVE_WORK ?= $(CURDIR)/.work
MODELS := $(GENSERVE_WORK)/models
STAMP := $(VENV)/.installed

.PHONY: run test install models system-deps bench clean

run: install models
	$(BIN)/genserve run --config configs/local.yaml

test: install system-deps models
	scripts/test.sh

# torch first, pinned: 2.13.0 is the local CPU build; an unpinned torch pulls a multi-GB CUDA build.
# GPU hosts: `pip install -e .[gpu]` with their own CUDA torch instead.
install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev,vllm]"
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	touch $@

models: install
	@test -f $(MODELS)/manifest.json || $(BIN)/genserve models build-tiny --out $(MODELS)

# Servers the tests run for real (started on 127.0.0.1 by the test fixtures).
system-deps:
	scripts/system-deps.sh

clean:
	rm -rf $(GENSERVE_WORK) .pytest_cache
