# The two commands: `make serve` (set up and run the server) and `make test` (set up and run the tests).
# torch is installed first, pinned, so that pip never pulls a different (multi-GB CUDA) build.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
# MODELS and PORT are flags only when given (make serve MODELS=tiny PORT=8001); unset, the
# FLUXSERVE_* environment variables (or their defaults: real models, port 8000) apply.
MODELS ?=
PORT   ?=
BIN     = $(VENV)/bin

.PHONY: serve test lint setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[postgres]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

serve: setup
	$(BIN)/fluxserve serve $(if $(MODELS),--models $(MODELS)) $(if $(PORT),--port $(PORT))

test: setup-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup-test   # style (ruff), types (mypy over src/), layering (import-linter contracts in pyproject.toml)
	$(BIN)/ruff check src tests bench deploy
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache
