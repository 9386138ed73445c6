# Two commands set up everything on first use: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
# pip finds a local CPU wheel of torch 2.13.0 on our machines; on a Linux GPU machine the same
# pin resolves to PyPI's CUDA build. Override e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
BIN = $(VENV)/bin
export MPLBACKEND ?= Agg

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH)" -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/mmdiag demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/mmdiag bench
	$(BIN)/python -m flows.bench_scale --json bench_scale.json
	$(BIN)/python -m flows.bench_vlm --json bench_vlm.json

clean:
	rm -rf $(VENV) runs bench.json bench_scale.json bench_vlm.json .pytest_cache
