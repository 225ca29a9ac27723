# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (scripts/setup.sh, the same
# script the Dockerfiles run). CPU set-up: torch pinned by constraints/cpu.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.onepiece-installed
BENCH_STAMP := $(VENV)/.onepiece-bench

.PHONY: setup test demo bench bench-transport compose-test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt scripts/setup.sh
	sh scripts/setup.sh $(VENV) test
	sh scripts/setup-system.sh
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m onepiece.demo

# Benchmarks also want Open MPI and mpi4py for the MPI baseline (best effort:
# without apt they run without it and say so).
$(BENCH_STAMP): $(STAMP)
	sh scripts/setup-bench.sh $(VENV)
	touch $@

bench: bench-transport

bench-transport: $(BENCH_STAMP)
	$(PY) bench/transport.py $(BENCH_ARGS)

# The compose stack on a real (private) Docker engine, a job through it, torn down
# (scripts/compose-test.sh; root; opt-in: it builds images).
compose-test: setup
	sh scripts/compose-test.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
