# Set-up is part of every target: a local virtual environment with the project installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-system clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/capray demo configs/demo.yaml $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q --ignore=tests/system $(ARGS)

# The reliability suite (docs/reliability.md): kept out of `make test`, whose CI budget is 20 min.
test-system: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests/system $(ARGS)

clean:
	rm -rf outputs .pytest_cache
