# Set-up is part of every target: a local virtual environment with the project installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest -q --durations=15

# The developer's loop (`make test-fast`): no Ray, no training jobs. The conftest refuses
# Ray here, so a test that needs it cannot slip into this list.
FAST := tests/test_config.py tests/test_configdoc.py tests/test_text.py tests/test_model.py \
	tests/test_images.py tests/test_readers.py tests/test_data.py tests/test_inputs.py tests/test_listing.py tests/test_shards.py tests/test_status.py tests/test_curves.py \
	tests/test_cluster.py tests/test_compat.py tests/test_imports.py tests/test_train_step.py tests/test_repo_text.py tests/test_logs.py

# Azurite, the Azure Blob emulator of `make test` (npm, into ./node_modules; .ci/run installs
# Node when missing). 3.35.0 is the last that runs on Node 20 (Debian 13's; 3.36 wants 21,
# 3.37 wants 22). fake-gcs-server comes with the `test` extra, moto is Python.
AZURITE_VERSION := 3.35.0
AZURITE := node_modules/.bin/azurite-blob

.PHONY: demo test test-fast test-system lint clean wheel

# uv installs the project in about a third of pip's time (docs/testing.md#where-cis-time-goes), the
# same versions; it reads no pip.conf, so behind a mirror that only pip.conf names use
# `make INSTALL=pip ...`.
INSTALL ?= uv

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
ifeq ($(INSTALL),uv)
	$(BIN)/pip install --quiet "uv>=0.13,<0.14"
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode -e ".[test,lint]"
else
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,lint]"
endif
	@command -v java >/dev/null || echo "NOTE: no java: evaluation will skip METEOR (apt-get install default-jre-headless; .ci/run does)"
	touch $@

$(AZURITE):
	npm install --no-save --no-package-lock --no-fund --no-audit --loglevel=error azurite@$(AZURITE_VERSION)

demo: $(BIN)/.installed
	$(BIN)/capray demo configs/demo.yaml model.precision=auto $(ARGS)

# ruff (lint + format check) and mypy, configured in pyproject.toml; `.ci/run` runs it first.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Every suite but the reliability one: unit, data, learning, jobs on local Ray and the storage
# emulators (moto S3, fake-gcs-server, Azurite).
# Two processes (pytest-xdist), a file each at a time: its tests mostly wait on Ray start-ups,
# worker processes importing TensorFlow and subprocess jobs, which overlap; a file's module
# fixtures are built once. The files with the most job tests go first (tests/conftest.py,
# docs/testing.md#where-cis-time-goes).
test: $(BIN)/.installed $(AZURITE)
	$(PYTEST) -n 2 --dist loadfile --no-loadscope-reorder --ignore=tests/system $(ARGS)

test-fast: $(BIN)/.installed
	CAPRAY_TEST_FAST=1 $(PYTEST) $(FAST) $(ARGS)

# The reliability suite (docs/reliability.md): killed workers and jobs, storage outages, nodes.
# Two processes too: its tests wait on node deaths, restarts and Ray start-ups (in one process
# 42% of the cores' time was idle, docs/testing.md#where-cis-time-goes); the longest files
# start first, and the files that share one run of jobs are one unit (tests/conftest.py).
test-system: $(BIN)/.installed
	$(PYTEST) -n 2 --dist loadfile --no-loadscope-reorder tests/system $(ARGS)

# The pinned capray that cluster.yaml copies to every node (dist/capray-<version>-py3-none-any.whl).
wheel: $(BIN)/.installed
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist .

clean:
	rm -rf outputs .pytest_cache
