# Entry points for developers and CI.  Every recipe runs with the pinned tools of .venv first on
# PATH (cargo lambda needs cargo-lambda and zig from there); infra/bootstrap.sh installs them.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV := $(ROOT)/.venv
PYTHON := $(VENV)/bin/python
export PATH := $(VENV)/bin:$(PATH)
export SAM_CLI_TELEMETRY := 0

.PHONY: help bootstrap dev test lint

help:
	@echo "make dev        start the local stack (DynamoDB emulator, mock LLM, cargo lambda watch)"
	@echo "make test       lint, then the whole test suite against a fresh local stack"
	@echo "make lint       rustfmt, clippy, SAM template validation and lint"
	@echo "make bootstrap  install the pinned tools into .venv"

bootstrap:
	infra/bootstrap.sh

dev: bootstrap
	$(PYTHON) infra/devstack.py up

lint: bootstrap
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	sam validate --lint
	$(PYTHON) -m py_compile infra/dynamo_emulator.py infra/tables.py infra/devstack.py

test: lint
	$(PYTHON) infra/devstack.py run -- cargo nextest run --workspace --no-fail-fast
