#!/usr/bin/env bash
# The SAM local emulator on this machine: a Docker engine of our own, the Lambda base image built
# locally, `sam build`, and the SAM local test suite.
#
#   infra/sam-local.sh test    everything below in order, then stops the engine it started
#                              (also on failure or Ctrl-C); what `make sam-test` runs
#   infra/sam-local.sh up      install what is missing, start the engine, build the base image;
#                              prints the DOCKER_HOST to export for `sam local ...` by hand
#   infra/sam-local.sh build   sam build of all four functions for x86_64 (the local architecture)
#   infra/sam-local.sh down    stop the engine started by `up` (by its pid) and clean up after it
#   infra/sam-local.sh status  whether the engine is running and the image exists
#
# Why each step (see ../shared/LOCAL-STACK.md for the recipe this follows):
# - Docker comes from Debian's packages (docker.io) and runs with its own data root, exec root,
#   socket and pidfile under $GW_SAM_STATE, without touching iptables, and without a bridge: every
#   container runs on the host network (infra/sam_host_network.py), so the functions reach the
#   DynamoDB emulator and the mock LLM on 127.0.0.1, and no docker0 is left behind.
# - public.ecr.aws/lambda/provided:al2023-x86_64 cannot be pulled here. SAM mounts its own runtime
#   interface emulator and the built bootstrap into the image, so the image only needs a libc and
#   CA certificates: a debootstrap'ed Debian minbase, imported under that name. The root
#   filesystem tarball is cached, so a wiped engine re-imports it in seconds.
# - Idempotent: installed packages, a running engine and an existing image are reused. `test`
#   stops the engine only if it started it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${GW_SAM_STATE:-$ROOT/.stack/sam-docker}"
VENV="$ROOT/.venv"
SOCK="$STATE/docker.sock"
PIDFILE="$STATE/dockerd.pid"
DATA="$STATE/data"
EXEC="$STATE/exec"
ROOTFS_TAR="$STATE/rootfs.tar"
IMAGE="public.ecr.aws/lambda/provided:al2023-x86_64"
SUITE="bookworm"
TIMINGS="$STATE/timings.txt"

export DOCKER_HOST="unix://$SOCK"
export PATH="$VENV/bin:$PATH"
export SAM_CLI_TELEMETRY=0

say() { echo "sam-local: $*" >&2; }
die() { say "error: $*"; exit 1; }

# Runs a step and appends "<step> <seconds>" to the timings file.
timed() {
  local name="$1"; shift
  local start=$SECONDS
  "$@"
  local took=$((SECONDS - start))
  mkdir -p "$STATE"
  echo "$name ${took}s" >> "$TIMINGS"
  say "$name took ${took}s"
}

require_root() {
  [[ $(id -u) -eq 0 ]] || die "the Docker engine needs root (run as root, as CI does)"
}

# ---------------------------------------------------------------------------------------------
# Packages

install_packages() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  ((${#missing[@]})) || return 0
  require_root
  say "installing ${missing[*]} from Debian's packages"
  # Installing docker.io must not start a system daemon of its own: policy-rc.d says no.
  local policy=/usr/sbin/policy-rc.d temp_policy=""
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && temp_policy=1
  fi
  local status=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  } || status=$?
  [[ -n $temp_policy ]] && rm -f "$policy"
  ((status == 0)) || die "apt-get install ${missing[*]} failed"
}

# ---------------------------------------------------------------------------------------------
# The engine

# The engine's pid: from its pidfile, or (before it wrote one) the one this script launched.
# Only a dockerd running with our data root counts, so a recycled pid is never taken for it.
engine_pid() {
  local pid
  for pid in "$(cat "$PIDFILE" 2>/dev/null || true)" "${DOCKERD_PID:-}"; do
    [[ $pid =~ ^[0-9]+$ ]] || continue
    if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--data-root $DATA"; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

engine_ready() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

# Set once this script has launched dockerd: `test` then stops it on exit, whatever happens.
STARTED_ENGINE=""

start_engine() {
  if engine_pid >/dev/null && engine_ready; then
    say "engine already running (pid $(engine_pid))"
    return 1 # not started by this call
  fi
  require_root
  mkdir -p "$DATA" "$EXEC"
  rm -f "$SOCK" "$PIDFILE"
  say "starting dockerd (state in $STATE)"
  # setsid: a Ctrl-C reaches this script, whose trap removes the containers and then stops the
  # engine; the engine itself must not get it first.
  STARTED_ENGINE=1
  setsid dockerd \
    --data-root "$DATA" --exec-root "$EXEC" --pidfile "$PIDFILE" -H "unix://$SOCK" \
    --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false \
    >"$STATE/dockerd.log" 2>&1 </dev/null &
  DOCKERD_PID=$!
  local i
  for i in $(seq 1 120); do
    engine_ready && { say "engine ready (pid $(engine_pid || echo '?'))"; return 0; }
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
      tail -20 "$STATE/dockerd.log" >&2
      die "dockerd exited during start-up (log: $STATE/dockerd.log)"
    fi
    sleep 0.5
  done
  tail -20 "$STATE/dockerd.log" >&2
  die "dockerd did not answer on $SOCK within 60 s"
}

stop_engine() {
  local pid
  if pid="$(engine_pid)"; then
    say "stopping dockerd (pid $pid)"
    # Containers first (sam local normally removes its own; a killed test may leave some).
    local leftover
    leftover="$(docker ps -aq 2>/dev/null || true)"
    [[ -z $leftover ]] || docker rm -f $leftover >/dev/null 2>&1 || true
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "dockerd (pid $pid) did not stop in 30 s, killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  # What a stopped engine can leave behind: mounts under its exec root (the network namespace
  # at exec/netns/default) and the bind mount dockerd puts on its data root, which stays when
  # dockerd dies during start-up (seen with a full disk); deepest first. (It runs without a
  # bridge: no docker0 to delete.)
  local mnt
  while read -r mnt; do
    umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || say "could not unmount $mnt"
  done < <(awk -v exec="$EXEC" -v data="$DATA" \
    '$2 == exec || $2 == data || index($2, exec "/") == 1 || index($2, data "/") == 1 {print $2}' \
    /proc/mounts | sort -r)
  rm -f "$SOCK" "$PIDFILE"
}

# ---------------------------------------------------------------------------------------------
# The base image

debian_mirror() {
  # apt's own mirror (a deb822 .sources file on Debian 12; a classic sources.list elsewhere).
  local uri
  uri="$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)"
  [[ -n $uri ]] || uri="$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

build_rootfs() {
  local dir="$STATE/rootfs"
  rm -rf "$dir" "$ROOTFS_TAR.tmp"
  say "debootstrap $SUITE minbase from $(debian_mirror) (about 30-40 s)"
  debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$dir" "$(debian_mirror)" \
    >"$STATE/debootstrap.log" 2>&1 || { tail -20 "$STATE/debootstrap.log" >&2; die "debootstrap failed"; }
  mkdir -p "$dir/var/task" "$dir/opt" "$dir/var/runtime"
  rm -rf "$dir/var/cache/apt/archives/"*.deb "$dir/var/lib/apt/lists/"*
  tar -C "$dir" -cf "$ROOTFS_TAR.tmp" .
  mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
  rm -rf "$dir"
}

ensure_image() {
  if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    say "image $IMAGE present"
    return 0
  fi
  [[ -s $ROOTFS_TAR ]] || timed debootstrap build_rootfs
  say "importing the root filesystem as $IMAGE"
  docker import --change 'WORKDIR /var/task' --change 'ENV LANG=C.UTF-8' "$ROOTFS_TAR" "$IMAGE" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# sam build and the tests

sam_build() {
  [[ -x $VENV/bin/sam && -x $VENV/bin/cargo-lambda ]] || "$ROOT/infra/bootstrap.sh"
  # A target dir of its own, for this command only: these are Lambda builds (zig, x86_64);
  # sharing target/ would make every concurrent debug build wait for the build-directory lock,
  # and the tests afterwards must use the normal one.
  #
  # The profile: the local build only has to behave like the deployed one, not run as fast, so
  # it trades optimisation for build time through cargo's profile variables (sam build cannot
  # pass --profile to cargo lambda): no LTO, parallel codegen, no optimisation. On 2 cores a cold
  # build of the four functions then takes about 3-5 minutes instead of 26-36. `sam build`
  # without this script (the deploy path) uses the release profile of Cargo.toml unchanged;
  # GW_SAM_FULL_RELEASE=1 uses it here too.
  local -a profile=()
  if [[ -z ${GW_SAM_FULL_RELEASE:-} ]]; then
    profile=(CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
      CARGO_PROFILE_RELEASE_OPT_LEVEL=0 CARGO_PROFILE_RELEASE_INCREMENTAL=false)
  fi
  (cd "$ROOT" && env "${profile[@]}" CARGO_TARGET_DIR="${GW_SAM_TARGET_DIR:-$ROOT/target/sam}" \
    sam build --config-env local)
}

run_tests() {
  # The DynamoDB emulator and the mock LLM on the host (no cargo lambda watch: SAM runs the
  # functions), then the SAM local test binary of the integration tests.
  (cd "$ROOT" && "$VENV/bin/python" infra/devstack.py run --services-only -- \
    cargo nextest run -p integration-tests --test sam_local --no-fail-fast "$@")
}

cmd_up() {
  mkdir -p "$STATE"
  timed install install_packages
  start_engine || true
  timed image ensure_image
  echo "export DOCKER_HOST=$DOCKER_HOST"
}

on_exit() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n $STARTED_ENGINE ]]; then stop_engine; fi
  exit "$status"
}

cmd_test() {
  mkdir -p "$STATE"
  : > "$TIMINGS"
  trap on_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  timed install install_packages
  start_engine || true
  timed image ensure_image
  timed sam-build sam_build
  timed sam-tests run_tests "$@"
  say "timings: $(tr '\n' ' ' < "$TIMINGS")"
}

case "${1:-}" in
  up) cmd_up ;;
  down) stop_engine ;;
  build) timed sam-build sam_build ;;
  test) shift; cmd_test "$@" ;;
  status)
    if pid="$(engine_pid)" && engine_ready; then say "engine running (pid $pid), DOCKER_HOST=$DOCKER_HOST"; else say "engine not running"; fi
    if engine_ready && docker image inspect "$IMAGE" >/dev/null 2>&1; then say "image $IMAGE present"; fi
    ;;
  *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
