# payroll-gateway: `make run` starts the demo, `make test` runs the whole suite.
# Both create .venv and install the pinned dependencies (requirements.lock) on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# make run CONFIG=path/to/gateway.toml PORT=9000 (defaults: the demo config, its port 8080)
CONFIG ?= examples/demo.toml
PORT   ?=
RUN_PORT := $(or $(PORT),8080)
DEMO_CURL := curl -sS -X POST http://127.0.0.1:$(RUN_PORT)/v1/reports -H 'Authorization: Bearer demo-key-746' -H 'Content-Type: application/json' --data @examples/report-drive-746.json

.PHONY: install run test lint check bench fuzz openapi clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@echo "Demo: SD Løn and KMD simulators run inside the gateway; data in .demo/"
	@echo "Submit the sample report (in another terminal):"
	@echo "  $(DEMO_CURL)"
	@echo "Then look at it:"
	@echo "  curl -sS http://127.0.0.1:$(RUN_PORT)/v1/reports/746/demo-746-1 -H 'Authorization: Bearer demo-key-746'"
	@echo
	$(PY) -m gateway serve --config $(CONFIG)$(if $(PORT), --port $(PORT))

# PostgreSQL tests fail (not skip) when this server does not answer; override to point elsewhere
PAYROLL_GATEWAY_TEST_PG ?= postgresql://postgres@127.0.0.1:5432/test

test: $(STAMP)
	PAYROLL_GATEWAY_TEST_PG=$(PAYROLL_GATEWAY_TEST_PG) $(PY) -m pytest

# schemathesis against every operation of /openapi.json: 100 cases per operation and mode
# (>= 2,000 in all); a 5xx or a response the document does not allow fails it
fuzz: $(STAMP)
	$(PY) -W error -m tests.fuzz 100

# rewrite schemas/openapi.json with the report schemas inlined (tests/test_openapi.py checks it)
openapi: $(STAMP)
	$(PY) -m gateway.openapi

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway adapters tests bench

# ruff (lint and format) and mypy (strict on gateway/ and adapters/, configured in pyproject.toml)
check: $(STAMP)
	$(VENV)/bin/ruff check gateway adapters tests bench
	$(VENV)/bin/ruff format --check gateway adapters tests bench
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .hypothesis
