#!/usr/bin/env bash
# Installs, pinned and idempotently, everything the local stack and the test suite need
# beyond the base image: a Python venv with the DynamoDB emulator, cargo-lambda, zig,
# the SAM CLI and cfn-lint, and the OpenAI Python SDK used by client-compatibility tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
STAMP="$VENV/.requirements.sha256"
WANT="$(cat "$ROOT/infra/requirements.txt" "$ROOT/infra/constraints.txt" | sha256sum | cut -d" " -f1)"

need() { command -v "$1" >/dev/null 2>&1 || { echo "bootstrap: '$1' is required but not installed" >&2; exit 1; }; }
need python3
need cargo

if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo "bootstrap: installing pinned tools into $VENV (first run takes about a minute)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip==24.3.1
  "$VENV/bin/pip" install --quiet -r "$ROOT/infra/requirements.txt" -c "$ROOT/infra/constraints.txt"
  echo "$WANT" > "$STAMP"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "bootstrap: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest@0.9.143
fi
# Supply-chain checks of `make test` (deny.toml). Compiling it takes minutes, once per machine.
CARGO_DENY_VERSION=0.20.2
if [[ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]]; then
  echo "bootstrap: installing cargo-deny $CARGO_DENY_VERSION (compiles for a few minutes, once)" >&2
  cargo install --locked "cargo-deny@$CARGO_DENY_VERSION"
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
