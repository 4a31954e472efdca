# `make distill`: set up .venv and run the main job (MNIST-1D teacher -> baseline -> KD student -> report).
# `make test`:    set up .venv and run the whole test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Nothing is downloaded at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: setup distill test test-fast lint format docs docs-build clean lock
.DEFAULT_GOAL := distill

# constraints.txt pins every package to the versions CI last tested (see `make lock`).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

distill: setup
	$(PY) -m distillery.pipeline $(ARGS)

# One pytest-xdist worker per core (TEST_WORKERS=0: one process, e.g. to debug).
TEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# The documentation site (mkdocs.yml; the API reference is generated from the package).
# `make docs` serves it at http://127.0.0.1:8000 and rebuilds on edits; `make docs-build`
# writes it to site/ with every warning an error, as tests/test_docs.py does.
export NO_MKDOCS_2_WARNING := 1
docs: setup
	$(PY) -m mkdocs serve $(ARGS)

docs-build: setup
	$(PY) -m mkdocs build --strict $(ARGS)

# Resolve the newest versions pyproject.toml allows into a scratch venv and write them to
# constraints.txt; then `make test` (which reinstalls from it) and commit it if it passes.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q -U pip
	.venv-lock/bin/python -m pip install -q -e ".[dev]"
	{ head -2 constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .venv-lock

clean:
	rm -rf logs outputs multirun site .pytest_cache .ruff_cache
