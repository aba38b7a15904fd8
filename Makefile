# Set-up and entry points. `make demo` and `make test` work on a fresh clone with no virtual environment.
# TORCH picks the PyTorch build installed first (GPU users: make demo TORCH="torch==2.13.0 --index-url ...").
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint hooks

$(BIN)/tl-devinterp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/tl-devinterp hooks

hooks:
	-git config core.hooksPath hooks

demo: setup
	$(BIN)/tl-devinterp demo

# Chromium drives the report's browser test; it is installed with apt where missing (root or sudo).
test: setup
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	    || echo "chromium not installed: browser tests will be skipped"
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check tl_devinterp tests benchmarks
