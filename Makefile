# Quick start:  make train   (the main job)   |   make test   (the test suite)
# Each target creates .venv and installs what it needs. torch is pinned in constraints.txt and installed
# first: an unpinned torch would pull a multi-GB CUDA build. `make test` (and `make setup-dev`) also install the
# system packages the tests and the docs examples need (`make system-deps`, Debian/Ubuntu apt-get, as root or
# through sudo); it is the only place they are installed (.ci/run goes through it too).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TEST_ENV := $(OFFLINE) OMP_NUM_THREADS=1
PYTEST_ARGS ?=

.PHONY: setup setup-dev system-deps train train-quick test lint docs clean

# System (Debian) packages: dataset-fashion-mnist (real images: tests/test_vision*.py, docs/vision.md's examples)
# and espeak-ng (speech recipes). Each is checked by what the code uses (the data folder, the program), so the
# target is a no-op, without apt-get, once they are there (however they were installed).
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
FASHION_MNIST_FILES := $(addprefix $(FASHION_MNIST_DIR)/,train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
	t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
SYSTEM_DEBS := dataset-fashion-mnist espeak-ng

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch
	$(PIP) install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install --quiet -c constraints.txt -e ".[all]"
	# resemblyzer's speaker-encoder weights (recipes/speech_commands.py and its tests read only that file): without
	# its dependencies, whose webrtcvad would need a C build
	$(PIP) install --quiet --no-deps -c constraints.txt resemblyzer
	touch $@

setup: $(VENV)/.base
setup-dev: system-deps $(VENV)/.dev

system-deps:  ## Debian packages the tests and docs examples need (idempotent; apt-get only when one is missing)
	@missing=""; \
	ls $(FASHION_MNIST_FILES) >/dev/null 2>&1 || missing="$$missing dataset-fashion-mnist"; \
	command -v espeak-ng >/dev/null 2>&1 || missing="$$missing espeak-ng"; \
	if [ -z "$$missing" ]; then echo "system-deps: $(SYSTEM_DEBS) already installed"; exit 0; fi; \
	fail() { echo "ERROR (make system-deps): $$1" >&2; \
	  echo "  The tests and docs examples need the Debian packages:$$missing" >&2; \
	  echo "  Install them yourself, e.g. as root: apt-get update && apt-get install -y$$missing" >&2; \
	  echo "  (on other systems: Fashion-MNIST's four idx-ubyte .gz files in $(FASHION_MNIST_DIR)/, espeak-ng on PATH)," >&2; \
	  echo "  then run make again." >&2; exit 1; }; \
	command -v apt-get >/dev/null 2>&1 || fail "apt-get not found (not a Debian/Ubuntu system)."; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	else fail "installing needs root, and sudo is not available."; fi; \
	echo "system-deps: installing$$missing (apt-get)"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq || fail "apt-get update failed (see above)."; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing \
	  || fail "apt-get install$$missing failed (see above)."; \
	ls $(FASHION_MNIST_FILES) >/dev/null 2>&1 || fail "Fashion-MNIST's files are not in $(FASHION_MNIST_DIR) after the install."; \
	command -v espeak-ng >/dev/null 2>&1 || fail "espeak-ng is not on PATH after the install."

train: setup  ## real transfer-learning run: all-MiniLM-L6-v2 on fine-food reviews, bottom half frozen
	$(OFFLINE) $(VENV)/bin/tl-plugin train $(ARGS)

train-quick: setup
	$(OFFLINE) $(VENV)/bin/tl-plugin train --quick $(ARGS)

test: system-deps setup-dev  ## the default test suite (no slow tests)
	$(TEST_ENV) $(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check tl_plugin tests recipes benchmarks
	$(VENV)/bin/mypy tl_plugin

clean:
	rm -rf $(VENV) outputs .pytest_cache .mypy_cache .ruff_cache
