# bloger: set up, run the quickstart, run the tests.
# `make install` makes .venv with a CPU build of torch pinned below (no CUDA download); on a GPU box
# install the CUDA build you want first, or run `make install TORCH="torch==2.13.0 --index-url ..."`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install quickstart test test-fast bench-prepare clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

quickstart: install
	$(BIN)/bloger prepare --config examples/quickstart.toml --workspace bloger-work/quickstart
	$(BIN)/bloger status --workspace bloger-work/quickstart

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

bench-prepare: install
	$(BIN)/python benchmarks/prepare_scale.py

clean:
	rm -rf bloger-work .pytest_cache
