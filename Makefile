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

.PHONY: demo test lint bench bench-scale lock clean

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

# The router against a bare pass-through proxy, side by side (~2.5 minutes). The load generator
# is wrk when it is on PATH (Debian: apt-get install wrk; nothing here installs it), else a
# Python one, which takes more of the cores from the servers: the output says which ran.
bench: $(STAMP)
	$(BIN)/python -m tests.bench

# The same router at 10k and at 1M orders, side by side (~3-5 minutes, ~1 GB in $TMPDIR).
bench-scale: $(STAMP)
	$(BIN)/python -m tests.bench_scale

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
