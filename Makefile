# Two commands set up everything on first use: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
# pip finds a local CPU wheel of torch 2.13.0 on our machines; on a Linux GPU machine the same
# pin resolves to PyPI's CUDA build. Override e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
# The versions CI tested (`make lock` writes it); torch is not in it, so TORCH stays your choice.
LOCK = constraints.txt
BIN  = $(VENV)/bin
PIP  = $(BIN)/pip install --quiet -c $(LOCK)
# the numeric path of a CPU without AVX-512 (PyTorch's kernels, oneDNN's and MKL's)
AVX2 = ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
export MPLBACKEND ?= Agg

.PHONY: setup demo test test-fast test-avx2 portability bench docs lint lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH)" -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/mmdiag demo

# The demo models the tests train are kept in .test-models (keyed by their config and code, as in
# the weights cache), so the second pass below and a second `make test` train nothing.
TEST_MODELS = MMDIAG_TEST_MODELS=$(CURDIR)/.test-models

# Two workers of one thread each (pytest-xdist); each demo model is trained once, by the first
# worker that needs it (tests/conftest.py, `demo_models`).
PARALLEL = OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
test: setup
	$(TEST_MODELS) $(PARALLEL) $(BIN)/python -m pytest -n 2

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# the tests on trained models once more, on the kernels of a CPU without AVX-512 (the models as
# `make test` trained them; `make portability` trains them under each setting)
test-avx2: setup
	$(TEST_MODELS) $(PARALLEL) $(AVX2) $(BIN)/python -m pytest -n 2 -m trained -p no:cacheprovider

# every trained-model property over 5 seeds and 4 numeric settings, beside the bound its test
# asserts (a table, and portability.json): the default setting alone (two threads), then the
# three one-thread settings two at a time; about 1.5 hours on 2 cores
portability: setup
	$(BIN)/python tests/portability.py --settings default --json .portability-default.json
	$(BIN)/python tests/portability.py --settings 1-thread,avx2,sse4.2 --jobs 2 --json .portability-kernels.json
	$(BIN)/python tests/portability.py --merge .portability-default.json .portability-kernels.json --json portability.json

bench: setup
	$(PIP) -e '.[bench]'
	$(BIN)/mmdiag bench
	$(BIN)/python -m mmdiag.flows.bench.scale --json bench_scale.json
	$(BIN)/python -m mmdiag.flows.bench.vlm --json bench_vlm.json

# The documentation site (MkDocs, Material, mkdocstrings) into site/; the API reference reads the
# package as installed, laid out here by links to the project's folders.
DOCS_PKG = build/docs-pkg/mmdiag
docs: setup
	$(PIP) -e '.[docs]'
	rm -rf build/docs-pkg && mkdir -p $(DOCS_PKG)
	ln -s $(CURDIR)/mmdiag/__init__.py $(DOCS_PKG)/__init__.py
	for floor in pipeline stages reports flows; do ln -s $(CURDIR)/$$floor $(DOCS_PKG)/$$floor; done
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

lint: setup
	$(PIP) -e '.[docs]'
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Resolve pyproject.toml afresh (every extra) in a scratch virtualenv and freeze what it got.
lock:
	rm -rf .venv-lock build
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH)" '.[dev,bench,data,examples,dask,docs]'
	{ echo "# The versions CI tested: written by \`make lock\` from pyproject.toml; read by \`make setup\`."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|mmdiag)( |=|@)'; } > $(LOCK)
	rm -rf .venv-lock build

clean:
	rm -rf $(VENV) build site runs bench.json bench_scale.json bench_vlm.json portability.json .portability-*.json .pytest_cache .test-models
