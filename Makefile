# twell: `make demo` and `make test` set everything up in a local virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without an NVIDIA driver, pin the CPU build of torch that pip can take from a local wheel cache;
# with one, let pip pick a CUDA build. Override with `make TORCH_SPEC=... test`.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
STAMP := $(VENV)/.twell-installed
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,energy]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/twell demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

LINT_PATHS := src tests $(wildcard benchmarks scripts)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

BENCH_PRESET ?= tiny

bench: $(STAMP)
	$(BIN)/twell bench kernels --preset $(BENCH_PRESET)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
