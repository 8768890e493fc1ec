# Two commands for a new user: `make demo` and `make test`. Both create .venv from
# requirements.txt the first time (a stamp file re-installs when requirements change).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all lint bench clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .  # the mcl-* commands (pyproject.toml)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m mcl_jax.demo --workdir=workdirs/demo

# -n 2: the suite is compile-bound (one XLA compile is single-threaded); two workers use
# both cores of a small machine. Set PYTEST_WORKERS=auto on a bigger one.
PYTEST_WORKERS ?= 2

# --durations: the slowest tests, printed at the end, show where the CI minutes go.
test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=15 tests

# Slow tests too (full-length runs that the default suite skips).
test-all: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup tests --runslow

# Lint (ruff check), formatting (ruff format --check; `ruff format` applies it) and types
# (mypy over the package). Their settings are in pyproject.toml.
LINT_PATHS := mcl_jax tests benchmarks launch

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy mcl_jax

bench: $(STAMP)
	$(PY) -m mcl_jax.bench --arch=resnet32 --members=1,2,4 --strategies=vmap,unroll,map --batch=128

clean-venv:
	rm -rf $(VENV)
