#!/usr/bin/env bash
# The advisories half of `make supply-chain`: cargo deny's RustSec check.
#
# RustSec's advisory database is a git repository on GitHub, which this project's machines cannot
# reach (package registries only). In order:
#   1. `cargo deny fetch db` works (GitHub reachable): check against the fresh database.
#   2. GW_ADVISORY_DB names a local clone of github.com/rustsec/advisory-db: it is linked where
#      cargo deny keeps its databases and checked offline; the commit date is printed, so an old
#      snapshot is visible.
#   3. A database fetched earlier is in $CARGO_HOME/advisory-dbs: checked offline, with its date.
#   4. None of these: the check is not run, and this says so loudly (exit 0, so that a machine
#      without GitHub can still run the rest of the suite; GW_REQUIRE_ADVISORIES=1 makes it fail).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DBS="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
# cargo deny names a database's directory after its URL; this is the name for the one in deny.toml.
DB_DIR="$DBS/advisory-db-3157b0e258782691"

say() { echo "supply-chain: $*" >&2; }

check_offline() {
  local date origin
  date="$(git -C "$DB_DIR" log -1 --format=%cs 2>/dev/null || echo unknown)"
  origin="$(git -C "$DB_DIR" remote get-url origin 2>/dev/null || echo unknown)"
  say "advisories: RustSec database of $date from $origin ($1)"
  cargo deny --offline check advisories
}

if timeout 60 cargo deny fetch db >/dev/null 2>&1; then
  check_offline "up to date with its origin"
elif [[ -n ${GW_ADVISORY_DB:-} ]]; then
  [[ -d $GW_ADVISORY_DB/crates ]] || { say "GW_ADVISORY_DB=$GW_ADVISORY_DB is not a clone of rustsec/advisory-db"; exit 1; }
  mkdir -p "$DBS"
  if [[ ! -e $DB_DIR || -L $DB_DIR ]]; then ln -sfn "$(cd "$GW_ADVISORY_DB" && pwd)" "$DB_DIR"; fi
  check_offline "from GW_ADVISORY_DB"
elif [[ -d $DB_DIR/crates ]]; then
  check_offline "fetched earlier; GitHub is unreachable now"
else
  say "advisories NOT checked: the RustSec database cannot be fetched from GitHub here and none"
  say "is on this machine (set GW_ADVISORY_DB to a clone of github.com/rustsec/advisory-db)"
  [[ -z ${GW_REQUIRE_ADVISORIES:-} ]] || exit 1
fi
