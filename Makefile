# bloger: set up, run the quickstart, run the tests.
# `make install` makes .venv with a CPU build of torch pinned below (no CUDA download); on a GPU box
# install the CUDA build you want first, or run `make install TORCH="torch==2.13.0 --index-url ..."`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install quickstart lint test test-fast bench-prepare bench-tokenize bench-train bench-decode bench-bilevel bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,plot,embed]"
	touch $@

QUICK := --config examples/quickstart.toml --workspace bloger-work/quickstart

quickstart: install
	$(BIN)/bloger prepare $(QUICK)
	HF_HUB_OFFLINE=1 $(BIN)/bloger embed $(QUICK)
	$(BIN)/bloger tokenize $(QUICK)
	$(BIN)/bloger train-bilevel $(QUICK)
	$(BIN)/bloger evaluate $(QUICK)
	$(BIN)/bloger export-ids $(QUICK)
	$(BIN)/bloger status --workspace bloger-work/quickstart

# the gate before the tests: lint (ruff) and types (mypy, config in pyproject.toml); CI runs `make test`
lint: install
	$(BIN)/ruff check bloger_cli tests benchmarks
	$(BIN)/mypy bloger_cli

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

bench-prepare: install
	$(BIN)/python benchmarks/prepare_scale.py

bench-tokenize: install
	$(BIN)/python benchmarks/tokenize_scale.py

bench-train: install
	$(BIN)/python benchmarks/train_speed.py

bench-decode: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/decode_speed.py

bench-bilevel: install
	$(BIN)/python benchmarks/bilevel_overhead.py

bench: bench-train bench-decode bench-bilevel

clean:
	rm -rf bloger-work .pytest_cache
