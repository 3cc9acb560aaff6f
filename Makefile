# Set-up is part of every target: a local virtual environment with the project installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-system clean wheel

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	@command -v java >/dev/null || echo "NOTE: no java: evaluation will skip METEOR (apt-get install default-jre-headless; .ci/run does)"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/capray demo configs/demo.yaml $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q --ignore=tests/system $(ARGS)

# The reliability suite (docs/reliability.md): kept out of `make test`, whose CI budget is 20 min.
test-system: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests/system $(ARGS)

# The pinned capray that cluster.yaml copies to every node (dist/capray-<version>-py3-none-any.whl).
wheel: $(BIN)/.installed
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist .

clean:
	rm -rf outputs .pytest_cache
