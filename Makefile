# Two entry points: `make demo` (the main job, embedded data) and `make test` (the test suite).
# Both create ./.venv with the pinned dependencies of setup.py on first use.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.test-installed: setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,demo]'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/qdq demo

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
