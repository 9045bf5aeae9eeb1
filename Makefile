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

.PHONY: install run test lint check bench reliability fuzz openapi clean

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

# make bench: the performance figures (bench/perf.py, under 15 minutes on 2 cores): results,
# chart and profile in bench/results/, the table in README.md. BENCH_ARGS=--quick: about 2
# minutes, README untouched. Needs wrk (installed here with apt-get when missing) and the
# PostgreSQL at 127.0.0.1:5432 (started here like .ci/run does when it is installed but down).
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -c requirements.lock -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
	@pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || { [ -d /etc/postgresql ] && \
		pg_ctlcluster --skip-systemctl-redirect "$$(ls /etc/postgresql | sort -V | tail -1)" main start && \
		for i in $$(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; }
	$(PY) bench/run.py $(BENCH_ARGS)

# the kill -9 rounds and the fault soak at full size (bench/reliability.py; short forms run in make test)
reliability: $(STAMP)
	$(PY) bench/run.py --reliability

clean:
	rm -rf $(VENV) .demo .pytest_cache .hypothesis
