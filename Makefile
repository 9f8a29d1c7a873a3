# mailplatform: `make run` to try it, `make test` to test it (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamps: reinstall only when a requirements file is newer than the last install.
RUN_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=
# The suite runs on this many pytest-xdist workers (each with its own database, broker and DATA_DIR:
# tests/pytest_workers.py); one file's tests stay on one worker, so module fixtures start once.
TEST_WORKERS ?= 2

.PHONY: run test test-tools lint format services install install-dev clean

run: $(RUN_STAMP)
	$(BIN)/python scripts/run.py

test: $(DEV_STAMP) services test-tools
	$(BIN)/python -m pytest -p tests.pytest_workers -n $(TEST_WORKERS) --dist loadfile --durations=30 $(PYTEST_ARGS)

# Real peers the tests talk to: an OpenID provider (Node's oidc-provider) for SSO, Debian's Chromium for the
# browser tests, and Debian's Dovecot, clamd, Postfix, NSD, pgbouncer and mail clients (scripts/install-test-servers.sh).
test-tools:
	bash scripts/install-oidc-provider.sh
	bash scripts/install-browser.sh
	bash scripts/install-test-servers.sh

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

services:
	bash scripts/services.sh

install: $(RUN_STAMP)
install-dev: $(DEV_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check --quiet -r requirements-dev.txt
	touch $(RUN_STAMP) $@

clean:
	rm -rf $(VENV) var/test var/test-*
