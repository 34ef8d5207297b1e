# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench

setup:
	bash scripts/setup_env.sh

# The main job: train RVSE++ on the bundled emoji subset with SelHN and with hardest-only.
demo: setup
	$(PY) -m rvsepp demo

# Lint, format check and the whole test suite (Triton kernels run in its interpreter).
test: setup lint
	TRITON_INTERPRET=1 OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The default CPU benchmark plan; rows, log and figures go to bench/out/ (ignored by git).
# `make bench UPDATE_RESULTS=1` appends to the committed bench/results/ instead.
BENCH_FLAGS := $(if $(UPDATE_RESULTS),--update-committed)
bench: setup
	$(PY) bench/run.py $(BENCH_FLAGS)
	$(PY) bench/plot.py $(BENCH_FLAGS)
