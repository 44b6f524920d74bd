# NoduleAI: the two set-up commands of the README are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: serve test test-fast check lint types install install-dev system-deps bench chaos e2e-deps fhir-deps ohif-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

## Installs are editable: code changes need none; a stamp per install redoes it only when
## pyproject.toml changed (so `make serve` does not reinstall on every start).
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,train]'
	touch $@ $(VENV)/.installed

system-deps:
	./scripts/system-deps.sh

## playwright-core (pinned by tests/e2e/package-lock.json) for the dashboard browser test.
e2e-deps:
	cd tests/e2e && npm ci --no-audit --no-fund

## OHIF's prebuilt viewer (npm @ohif/app, version and sha512 pinned in the script), fetched once
## into ~/.cache/noduleai for the OHIF end-to-end test; nothing of OHIF is committed.
ohif-deps:
	tests/e2e/ohif/fetch-ohif.sh

## Medplum's FHIR router (pinned by tests/fhir_server/package-lock.json), the tests' FHIR R4 server.
fhir-deps:
	npm ci --prefix tests/fhir_server --no-audit --no-fund

## Install and start the service on its embedded defaults (SQLite, embedded queue, CPU).
serve: install
	$(BIN)/noduleai serve

## Install everything the tests need; lint (ruff check, ruff format --check), type-check (mypy
## strict) and run the whole suite (SQLite and PostgreSQL). What CI runs (.ci/run).
test: system-deps install-dev e2e-deps fhir-deps ohif-deps lint types
	$(BIN)/pytest

## The quick subset while working: lint, types and the unit tests (no peers; a few minutes).
test-fast: install-dev lint types
	$(BIN)/pytest -m unit

lint: install-dev
	$(BIN)/ruff check dicom_node pipelines models tests benchmarks
	$(BIN)/ruff format --check dicom_node pipelines models tests benchmarks

types: install-dev
	$(BIN)/mypy

## The same as test (kept for habit).
check: test

bench: install-dev
	$(BIN)/python benchmarks/ingest.py

## The long fuzz run: 10,000 malformed PDUs and 10,000 mutated datasets against a node of its own
## (tests/chaos.py; about 15 minutes on two cores). The normal suite runs a short version.
chaos: install-dev
	$(BIN)/python -m tests.chaos --pdus 10000 --datasets 10000
