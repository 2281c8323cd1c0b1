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
SOURCE ?= synthetic
UI_PORT ?= 3000

.PHONY: setup run test ui bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # local CPU wheel first: never a multi-GB CUDA build
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	touch $@

run: setup $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m adrec_assets.cli register $(SOURCE)
	time $(BIN)/dagster asset materialize -m adrec_assets.definitions --select '*' --partition $(SOURCE)
	$(PY) -m adrec_assets.cli summary $(SOURCE)

test: setup
	$(BIN)/pytest -q adrec_assets_tests

ui: setup $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m adrec_assets.cli register
	$(BIN)/dagster dev -m adrec_assets.definitions -h 127.0.0.1 -p $(UI_PORT)

bench: setup
	$(PY) benchmarks/materialize_synthetic.py

clean:
	rm -rf data/artifacts $(DAGSTER_HOME)
