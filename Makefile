# Quick start:  make train   (the main job)   |   make test   (the test suite)
# Each target creates .venv and installs what it needs. torch is pinned in constraints.txt and installed
# first: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TEST_ENV := $(OFFLINE) OMP_NUM_THREADS=1
PYTEST_ARGS ?=

.PHONY: setup setup-dev train train-quick test lint docs clean

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch
	$(PIP) install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install --quiet -c constraints.txt -e ".[all]"
	touch $@

setup: $(VENV)/.base
setup-dev: $(VENV)/.dev

train: setup  ## real transfer-learning run: all-MiniLM-L6-v2 on fine-food reviews, bottom half frozen
	$(OFFLINE) $(VENV)/bin/tl-plugin train $(ARGS)

train-quick: setup
	$(OFFLINE) $(VENV)/bin/tl-plugin train --quick $(ARGS)

test: setup-dev  ## the default test suite (no slow tests)
	$(TEST_ENV) $(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check tl_plugin tests recipes benchmarks
	$(VENV)/bin/mypy tl_plugin

clean:
	rm -rf $(VENV) outputs .pytest_cache .mypy_cache .ruff_cache
