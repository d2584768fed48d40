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

.PHONY: help bootstrap dev test test-main lint bench sam-test sam-build sam-up sam-down reliability supply-chain

help:
	@echo "make dev        start the local stack (DynamoDB emulator, mock LLM, cargo lambda watch)"
	@echo "make test       everything below but bench: lint, supply-chain, test-main, reliability, sam-test"
	@echo "make test-main  the unit, contract and end-to-end tests against a fresh local stack"
	@echo "make sam-test   Docker engine + base image, sam build (x86_64), the SAM local tests"
	@echo "make sam-up     start the Docker engine for sam local by hand (sam-down stops it)"
	@echo "make lint       rustfmt, clippy, SAM template validation and lint"
	@echo "make reliability  hostile input, schemathesis, load with faults, DynamoDB outage, key timing, log and RS256 audits"
	@echo "make supply-chain cargo deny: licences, bans, sources (advisories when the database is reachable)"
	@echo "make bootstrap  install the pinned tools into .venv"
	@echo "make bench      Rust functions vs the FastAPI reference (release builds + zips + ~20 min of measurement); see BENCHMARKS.md"

bootstrap:
	infra/bootstrap.sh

dev: bootstrap
	$(PYTHON) infra/devstack.py up

lint: bootstrap
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	sam validate --lint
	$(PYTHON) -m py_compile infra/dynamo_emulator.py infra/tables.py infra/devstack.py \
		tests/bench/bench.py tests/bench/reference/app.py infra/sam_host_network.py
	bash -n infra/sam-local.sh infra/advisories.sh

# The whole suite, what `.ci/run` runs: lint and supply chain first (fast failures), then three
# stacks one after the other: the main run on the shared test stack, the reliability and audit
# suites on fresh stacks of their own, the SAM local tests in a Docker engine of their own.
# All three run even when an earlier one failed; the recipe fails if any did.
test: lint supply-chain
	@failed=""; \
	for part in test-main reliability sam-test; do \
		start=$$SECONDS; \
		$(MAKE) --no-print-directory $$part || failed="$$failed $$part"; \
		echo "make test: $$part took $$((SECONDS - start)) s"; \
	done; \
	if [ -n "$$failed" ]; then echo "make test: FAILED:$$failed"; exit 1; fi; \
	echo "make test: all parts passed"

# The SAM local tests need Docker and `sam build`: they run in sam-test, after the main suite.
SAM_TESTS := binary_id(integration-tests::sam_local)

test-main: bootstrap
	$(PYTHON) infra/devstack.py run -- cargo nextest run --workspace --no-fail-fast -E 'not $(SAM_TESTS)'

# Suites that disturb the stack they run against, each on a fresh stack of its own and never
# beside the main run (RELIABILITY.md): hostile input, load with faults, DynamoDB paused, key
# timing, schemathesis, one at a time; then debug logging with an RS256 configuration
# (.config/nextest.toml leaves both out of the main run).
AUDIT_JWT_KEY = $(shell awk '{printf "%s\\n", $$0}' shared/tests/fixtures/rs256_public.pem)
reliability: bootstrap
	GW_SUITE=reliability $(PYTHON) infra/devstack.py run --concurrency 8 -- \
		cargo nextest run -p integration-tests --profile reliability
	GW_SUITE=audit $(PYTHON) infra/devstack.py run --function-env RUST_LOG=debug \
		--function-env JWT_ALGORITHM=RS256 --function-env "JWT_PUBLIC_KEY=$(AUDIT_JWT_KEY)" \
		--function-env JWT_ISSUER=https://issuer.audit.test --function-env JWT_AUDIENCE=gateway-audit \
		-- cargo nextest run -p integration-tests --profile audit

# cargo-deny with deny.toml: licences, bans and sources offline from Cargo.lock, then RustSec's
# advisories where a database can be had (infra/advisories.sh says which, or that none could).
supply-chain: bootstrap
	cargo deny check licenses bans sources
	infra/advisories.sh

# Installs docker.io and debootstrap when missing, starts a Docker engine of its own, builds the
# Lambda base image once, runs `sam build` (x86_64) and the SAM local tests, stops the engine.
sam-test: bootstrap
	infra/sam-local.sh test

sam-build: bootstrap
	infra/sam-local.sh build

sam-up: bootstrap
	infra/sam-local.sh up

sam-down:
	infra/sam-local.sh down

# Not part of `make test`: release builds, the zips and ~20 minutes of measurement on the shared
# stack. BENCH_ARGS passes options through, e.g. BENCH_ARGS="--skip-package --only warm".
bench: bootstrap
	$(PYTHON) tests/bench/bench.py $(BENCH_ARGS)
