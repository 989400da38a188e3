# edgekit: the two commands (make demo, make test) and the benchmarks (make bench).
# Each creates .venv with what it needs on a fresh Debian machine with Python 3.11.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test bench clean

$(BIN)/python:
	PYTHON=$(PYTHON) scripts/ensure-python.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.demo-deps: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[all]'
	touch $@

$(VENV)/.dev-deps: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[dev]'
	touch $@

demo: $(VENV)/.demo-deps
	PATH="$(abspath $(BIN)):$$PATH" scripts/demo.sh

test: $(VENV)/.dev-deps
	scripts/setup-test-system.sh
	$(BIN)/python -m pytest

bench: $(VENV)/.dev-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .cache bundles bench/results
