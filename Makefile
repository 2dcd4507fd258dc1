# proxytap: `make run` installs and starts the proxy, `make test` installs and tests it.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# mitmproxy 12 needs Python >= 3.12. The first interpreter that really runs and
# is new enough wins (pyenv shims on PATH may exist and still fail).
PY_CANDIDATES := python3.13 python3.12 $(sort $(wildcard $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python3))
ifndef PYTHON
PYTHON := $(firstword $(foreach c,$(PY_CANDIDATES),$(shell $(c) -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && echo $(c))))
endif
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: help run test test-slow lint fmt bench clean python

help:
	@echo "make run    install into .venv and run proxytap (HTTP 127.0.0.1:8080, SOCKS 127.0.0.1:1080)"
	@echo "make test   install into .venv, lint, type-check and run the test suite"
	@echo "make lint   ruff check, ruff format --check, mypy"
	@echo "make bench  benchmark proxytap against direct and peers (see bench/README.md)"

python:
	@if [ -z "$(PYTHON)" ]; then \
	  echo "proxytap needs Python >= 3.12 (mitmproxy 12 requires it)."; \
	  echo "Tried: $(PY_CANDIDATES)"; \
	  echo "Install one (e.g. 'pyenv install 3.12') or run 'make PYTHON=/path/to/python3.12 ...'."; \
	  exit 1; fi

$(STAMP): pyproject.toml | python
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/proxytap run $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check proxytap tests addons bench
	$(VENV)/bin/ruff format --check proxytap tests addons bench
	$(VENV)/bin/mypy

test: $(STAMP) lint
	tests/setup-tools.sh
	$(VENV)/bin/pytest -q $(ARGS)

test-slow: $(STAMP)
	tests/setup-tools.sh
	$(VENV)/bin/pytest -q -m slow $(ARGS)

fmt: $(STAMP)
	$(VENV)/bin/ruff format proxytap tests addons bench
	$(VENV)/bin/ruff check --fix proxytap tests addons bench

bench: $(STAMP)
	bench/run.sh $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
