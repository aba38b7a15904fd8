# Set-up and entry points. `make demo` and `make test` work on a fresh clone with no virtual environment.
# TORCH picks the PyTorch build installed first (GPU users: make demo TORCH="torch==2.13.0 --index-url ...").
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TL3 ?= transformer_lens==3.9.0
BIN := $(VENV)/bin
BIN_TL3 := $(VENV)-tl3/bin

.PHONY: setup demo notebook-data notebooks test test-tl3 lint hooks

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

# The part of the demo run that notebooks 01-03 read (notebooks/data/demo); after `make demo`.
notebook-data: setup
	$(BIN)/python notebooks/data/ship_demo.py tl_devinterp_demo

# Every notebook executed top to bottom and saved in place with its outputs and figures (after notebook-data).
notebooks: setup
	$(BIN)/python notebooks/execute.py

# Chromium drives the report's browser test; it is installed with apt where missing (root or sudo).
test: setup
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	    || echo "chromium not installed: browser tests will be skipped"
	$(BIN)/ruff check tl_devinterp tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(MAKE) test-tl3

# TransformerLens 3.x, where a user may hand in a HookedTransformer: the tests that cover that path.
$(BIN_TL3)/pytest: pyproject.toml
	$(PYTHON) -m venv $(VENV)-tl3
	$(BIN_TL3)/pip install -q --upgrade pip
	$(BIN_TL3)/pip install -q $(TORCH)
	$(BIN_TL3)/pip install -q -e ".[dev]" "$(TL3)"
	touch $@

test-tl3: $(BIN_TL3)/pytest
	$(BIN_TL3)/python -m pytest -q -p no:cacheprovider -m "not slow" tests/test_models.py tests/test_series.py \
	    tests/test_metrics_heads.py tests/test_metrics_behaviour.py tests/test_llc.py tests/test_dynamics.py \
	    tests/test_series_hf.py tests/test_hf_downstream.py tests/test_sampler_models.py tests/test_fast_forward.py

lint: setup
	$(BIN)/ruff check tl_devinterp tests benchmarks
