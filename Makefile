# capsim: `make` lists the targets. Every target sets up what it needs on a fresh machine.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install; override it for a GPU machine, e.g. make setup TORCH_SPEC='torch==2.9.1'
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.capsim-installed
# make test's processes (pytest-xdist) for the tests not marked exclusive; those then run alone
TEST_WORKERS ?= 2
# the compiled scheduler and step-time modules (capsim.native): rebuilt when one of their sources changes
NATIVE := build/native/manifest.json
NATIVE_SRC := src/capsim/native.py $(addprefix src/capsim/policy/,sched_types.py block_pool.py decode_runs.py scheduling.py least.py) src/capsim/sim/step_time.py

.PHONY: help setup native test test-all test-fast mutate lint bench demo profile validate lab notebooks kernel clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(NATIVE): $(STAMP) $(NATIVE_SRC)
	@mkdir -p build
	@$(PY) -m capsim.native > build/native.log 2>&1 || true
	@tail -n 1 build/native.log

setup: $(STAMP) $(NATIVE) ## create .venv with a pinned torch (TORCH_SPEC) and capsim[dev], and compile capsim.native

native: $(NATIVE) ## compile the scheduler and step-time modules with mypyc (about a minute; pure Python if it fails; CAPSIM_NATIVE=0 turns it off)

test: $(NATIVE) ## run the whole test suite: TEST_WORKERS processes, then the tests marked exclusive alone (real redis-server tests skip, loudly, if it is missing)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not exclusive"
	$(PY) -m pytest -q -m exclusive

test-all: $(NATIVE) ## the whole suite with the real-Redis and real-Prometheus tests required (fails, not skips, without redis-server or prometheus)
	CAPSIM_REQUIRE_REDIS=1 CAPSIM_REQUIRE_PROMETHEUS=1 $(MAKE) test

test-fast: $(NATIVE) ## the tests without those marked slow
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP) ## ruff, mypy on src/, the import contracts, capsim check on the shipped scenarios, no stored notebook outputs
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/capsim check data/scenarios/*.yaml
	@$(PY) -c 'import sys, nbformat; bad = sorted({p for p in sys.argv[1:] for c in nbformat.read(p, 4).cells if c.cell_type == "code" and (c.outputs or c.execution_count)}); sys.exit("notebooks stored with outputs (clear them before committing): " + ", ".join(bad) if bad else 0)' notebooks/*.ipynb

mutate: $(STAMP) ## mutation testing (mutmut) of the promise-carrying modules; MUTATE='batcher policy-batching' picks targets (slow, not CI; docs/testing.md)
	$(PY) scripts/mutate.py $(MUTATE) $(MUTATE_ARGS)

bench: $(NATIVE) ## run every benchmark in benchmarks/ (tables on stdout, JSON in benchmarks/results/)
	@set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b $(BENCH_ARGS); done

profile: $(NATIVE) ## measure the reference model on this machine into data/profiles/ (quick sweep; replaces the quick profile)
	$(VENV)/bin/capsim profile --quick --force

validate: $(NATIVE) ## the real pod vs the simulator at 30/60/85% load (about 6 min; replaces data/validation/)
	$(VENV)/bin/capsim validate --force

demo: $(NATIVE) ## the main job on the embedded defaults (memory:// store, CPU if no GPU); writes out/report.md
	$(VENV)/bin/capsim demo

kernel: $(NATIVE) ## register the venv's Python as the Jupyter kernel "capsim" (inside .venv, not per user)
	$(PY) -m ipykernel install --sys-prefix --name capsim --display-name "capsim (.venv)" >/dev/null

lab: kernel ## JupyterLab on the project's venv, kernel "capsim", opened on notebooks/
	$(VENV)/bin/jupyter lab notebooks/

notebooks: kernel ## execute every notebook (papermill; CAPSIM_QUICK=1 for quick mode) and render HTML under build/notebooks/
	@mkdir -p build/notebooks
	@set -e; for nb in notebooks/[0-9][0-9]_*.ipynb; do echo "== $$nb"; \
	  $(VENV)/bin/papermill -k capsim --cwd . "$$nb" "build/notebooks/$$(basename $$nb)"; done
	$(VENV)/bin/jupyter nbconvert --to html --output-dir build/notebooks build/notebooks/[0-9][0-9]_*.ipynb

clean: ## remove caches and benchmark results (keeps .venv)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis .mutmut benchmarks/results/*.json
