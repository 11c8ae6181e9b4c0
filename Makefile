# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.attnflow-installed

# The shared data mirror beside the checkout, when there is one (tests and demo
# read datasets from it before trying to download).
ATTNFLOW_DATA_MIRROR ?= $(if $(wildcard ../shared/data/SHA256SUMS),$(abspath ../shared/data),)
export ATTNFLOW_DATA_MIRROR

.PHONY: demo test test-slow fuzz lint venv clean

venv: $(STAMP)

# torch first, pinned, so that nothing later pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/attnflow demo

test: venv
	$(BIN)/ruff check .
	$(BIN)/python tools/audit.py
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

# Property tests with fresh random examples, 2000 each (the gate draws a fixed 60).
fuzz: venv
	ATTNFLOW_HYPOTHESIS_PROFILE=fuzz ATTNFLOW_FUZZ_EXAMPLES=2000 $(BIN)/python -m pytest -q \
		tests/reliability/test_bad_input.py -k "refuses_garbage or refuses_any_mix or round_trip"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf data reports .attnflow gx/uncommitted
