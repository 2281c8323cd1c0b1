# adrec: `make run` sets up and materializes the built-in `synthetic` source end to end;
# `make test` sets up and runs the test suite; `make ui` opens the Dagster UI.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Development machines pseudonymize with the public dev key (loud warning); a deployment sets a
# secret ADREC_ID_KEY and leaves this unset, so a missing key is an error there.
export ADREC_ALLOW_DEV_KEY ?= 1
SOURCE ?= synthetic
# evaluation splits, comma-separated: make evaluate SOURCE=ml-latest-small EVAL_SEEDS=0,1,2,3,4
EVAL_SEEDS ?= 0
UI_PORT ?= 3000
SERVE_PORT ?= 8000

.PHONY: setup system-deps run evaluate test lint format ui serve demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # local CPU wheel first: never a multi-GB CUDA build
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

$(DAGSTER_HOME)/dagster.yaml: deploy/dagster.dev.yaml
	mkdir -p $(DAGSTER_HOME)
	cp deploy/dagster.dev.yaml $@

run: setup $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m adrec_assets.cli register $(SOURCE)
	time $(BIN)/dagster asset materialize -m adrec_assets.definitions --select 'group:adrec' --partition $(SOURCE)
	$(PY) -m adrec_assets.cli summary $(SOURCE)

# Cold-start quality report of an already materialized source (retrains twice on a split).
evaluate: setup $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m adrec_assets.cli register $(SOURCE)
	time $(BIN)/dagster asset materialize -m adrec_assets.definitions --select evaluation --partition $(SOURCE) \
		--config-json '{"ops": {"evaluation": {"config": {"seeds": [$(EVAL_SEEDS)]}}}}'

# Debian's Chromium, PostgreSQL and Redis servers for the browser, PostgreSQL and Redis tests (as root via
# apt-get; a no-op when present). Where they cannot be installed those tests skip, saying why.
system-deps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/redis-server ] && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "system-deps: need root and apt-get for chromium + postgresql + redis-server; those tests will skip"; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	(apt-get update -q && apt-get install -y -q chromium postgresql redis-server) >/tmp/adrec-system-deps.log 2>&1 \
		&& echo "system-deps: chromium + postgresql + redis-server installed" \
		|| { tail -5 /tmp/adrec-system-deps.log; echo "system-deps: apt-get failed; the UI/PostgreSQL/Redis tests will skip"; }

test: setup system-deps
	$(BIN)/pytest -q adrec_assets_tests

# ruff, configured in pyproject.toml: the formatter's verdict and the linter's, changing nothing.
lint: setup
	$(BIN)/ruff format --check adrec_assets adrec_assets_tests benchmarks data/catalog
	$(BIN)/ruff check adrec_assets adrec_assets_tests benchmarks data/catalog

format: setup
	$(BIN)/ruff format adrec_assets adrec_assets_tests benchmarks data/catalog
	$(BIN)/ruff check --fix adrec_assets adrec_assets_tests benchmarks data/catalog

ui: setup $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m adrec_assets.cli register
	$(BIN)/dagster dev -m adrec_assets.definitions -h 127.0.0.1 -p $(UI_PORT)

# The online service on 127.0.0.1:$(SERVE_PORT) over the source's published snapshot (after `make run`).
serve: setup
	$(PY) -m adrec_assets.serve --source $(SOURCE) --host 127.0.0.1 --port $(SERVE_PORT)

# The same service with its demo page (choose a user, click ads, upload an ad) at /demo (after `make run`).
# The demo moves users by the click-only EMA, so one click visibly reorders the list; the service's default, the
# per-user posterior, moves by evidence (one click raises the ad's score, not always past the top 8).
demo: setup
	@echo "adrec demo: http://127.0.0.1:$(SERVE_PORT)/demo  (the page appears once the service has loaded the snapshot)"
	ADREC_SERVE_USER_UPDATE=ema $(PY) -m adrec_assets.serve --source $(SOURCE) --host 127.0.0.1 --port $(SERVE_PORT)

bench: setup
	$(PY) benchmarks/materialize_synthetic.py

clean:
	rm -rf data/artifacts data/online $(DAGSTER_HOME)
