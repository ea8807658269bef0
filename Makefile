# Entry points: `make demo` (the main job, embedded data), `make test` (the fast suite) and `make test-all` (every
# test, slow end-to-end runs included: what CI runs). Each creates ./.venv with the pinned dependencies of setup.py
# on first use and says so.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest --durations=10

.PHONY: demo test test-all clean-venv

$(BIN)/python:
	@echo "creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: setup.py | $(BIN)/python
	@echo "installing qdq and the demo's pinned dependencies into $(VENV) (torch and onnxruntime: 1-3 min the first time)"
	$(BIN)/python -m pip install --progress-bar off -e '.[demo]' > $(VENV)/pip-demo.log 2>&1 || { tail -n 30 $(VENV)/pip-demo.log; exit 1; }
	$(BIN)/python -c "import qdq.tensor_quant, sklearn, matplotlib"
	touch $@

$(VENV)/.test-installed: setup.py | $(BIN)/python
	@echo "installing qdq and the test suite's pinned dependencies into $(VENV) (1-3 min the first time)"
	$(BIN)/python -m pip install --progress-bar off -e '.[test,demo]' > $(VENV)/pip-test.log 2>&1 || { tail -n 30 $(VENV)/pip-test.log; exit 1; }
	$(BIN)/python -c "import qdq.tensor_quant, pytest, sklearn, matplotlib, timm, transformers"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/qdq demo

test: $(VENV)/.test-installed
	$(PYTEST) -m "not slow"

test-all: $(VENV)/.test-installed
	$(PYTEST)

clean-venv:
	rm -rf $(VENV)
