# One command per chore. Each target creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The exact versions (with their hashes) that every install uses; pyproject.toml keeps ranges.
LOCK   := requirements.lock
# What writes the lock lives in its own venv: it is not one of the pinned dependencies.
LOCK_TOOL := uv==0.13.9
LOCK_VENV := .venv-lock

.PHONY: demo test lint bench lock clean

# A changed lock rebuilds the venv from nothing, so a package it dropped is gone too.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# `make demo PORT=8000`: the router on 8000, metrics on 8001, the simulated providers on 8002-8004.
demo: $(STAMP)
	$(BIN)/smm-router demo $(if $(PORT),--port $(PORT))

test: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m tests.bench

lint: $(STAMP)
	$(BIN)/ruff check router tests
	$(BIN)/ruff format --check router tests
	$(BIN)/mypy --strict router

# Re-resolve pyproject.toml's ranges (with the dev extra) to the newest versions, for
# Python 3.11 on Linux; commit the result.
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet $(LOCK_TOOL)
	$(LOCK_VENV)/bin/uv pip compile pyproject.toml --extra dev --upgrade --generate-hashes \
		--python-version 3.11 --python-platform linux --custom-compile-command 'make lock' \
		--quiet --output-file $(LOCK)

clean:
	rm -rf $(VENV) $(LOCK_VENV) var .pytest_cache .mypy_cache .ruff_cache
