#!/usr/bin/env bash
# Gateway-overhead benchmark: `bash benches/overhead/run.sh`.
#
# Installs what is missing (nginx, wrk, python3-venv via apt-get; vllm-router
# 0.1.17 in a venv), builds the release gateway, then hands over to
# overhead.py, which starts a static nginx upstream, nginx proxy_pass,
# vllm-router and cacheroute on free 127.0.0.1 ports and runs wrk against
# each. Results go to bench-results/overhead-<timestamp>.md|json.
#
# Environment (all optional):
#   DURATION=6s CONNECTIONS=32 THREADS=1   wrk parameters (same for every target)
#   ROUNDS=3 WARMUP=2s                     interleaved rounds; warm-up per run
#   TARGETS=direct,nginx-proxy,vllm-router,cacheroute   a subset
#   SKIP_BUILD=1                           use the existing release binary
#   CACHEROUTE_BIN=path                    gateway binary (default target/release/cacheroute)
#   VLLM_ROUTER_BIN=path                   an existing vllm-router (skips the venv)
#   BENCH_VENV=dir                         venv for vllm-router (default target/bench-venv)
#   RESULTS_DIR=dir                        default bench-results
#   KEEP_WORK=1                            keep the scratch folder (configs, logs, wrk output)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
VLLM_ROUTER_VERSION=0.1.17

say() { echo "==> [overhead] $*"; }
die() { echo "!!! [overhead] $*" >&2; exit 1; }

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
APT_UPDATED=""
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "$APT_UPDATED" ]; then
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  say "apt-get install -y $*"
  $SUDO apt-get install -y -qq --no-install-recommends "$@"
}

find_nginx() {
  command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true
}

# --- tools -------------------------------------------------------------------
missing=()
[ -n "$(find_nginx)" ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if [ "${SKIP_BUILD:-}" != 1 ]; then
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
fi
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
NGINX_BIN="$(find_nginx)"
[ -n "$NGINX_BIN" ] || die "nginx not found after install"

# --- vllm-router --------------------------------------------------------------
if [ -n "${VLLM_ROUTER_BIN:-}" ]; then
  [ -x "$VLLM_ROUTER_BIN" ] || die "VLLM_ROUTER_BIN=$VLLM_ROUTER_BIN is not executable"
else
  VENV="${BENCH_VENV:-$TARGET_DIR/bench-venv}"
  VLLM_ROUTER_BIN="$VENV/bin/vllm-router"
  have=""
  if [ -x "$VLLM_ROUTER_BIN" ] && [ -x "$VENV/bin/pip" ]; then
    have="$("$VENV/bin/pip" show vllm-router 2>/dev/null | sed -n 's/^Version: *//p')"
  fi
  if [ "$have" != "$VLLM_ROUTER_VERSION" ]; then
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
      pyver="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
      apt_install python3-venv "python${pyver}-venv" || apt_install python3-venv
    fi
    say "installing vllm-router==$VLLM_ROUTER_VERSION into $VENV"
    [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "vllm-router==$VLLM_ROUTER_VERSION"
    [ -x "$VLLM_ROUTER_BIN" ] || die "vllm-router not found in $VENV after pip install"
  fi
fi

# --- the gateway --------------------------------------------------------------
CACHEROUTE_BIN="${CACHEROUTE_BIN:-$TARGET_DIR/release/cacheroute}"
if [ "${SKIP_BUILD:-}" != 1 ]; then
  say "cargo build --release -p cacheroute-cli"
  cargo build --release -p cacheroute-cli
fi
[ -x "$CACHEROUTE_BIN" ] || die "no gateway binary at $CACHEROUTE_BIN (build it, or set CACHEROUTE_BIN)"

# --- run ----------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cr-overhead.XXXXXX")"
DRIVER_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$DRIVER_PID" ] && kill -0 "$DRIVER_PID" 2>/dev/null; then
    kill -TERM "$DRIVER_PID" 2>/dev/null || true
    wait "$DRIVER_PID" 2>/dev/null || true
  fi
  # Backstop: process groups the driver started and did not reap.
  if [ -s "$WORK/pids" ]; then
    while read -r pid; do
      [ -n "$pid" ] && kill -KILL -- "-$pid" 2>/dev/null || true
    done < "$WORK/pids"
  fi
  if [ "$rc" != 0 ] || [ "${KEEP_WORK:-}" = 1 ]; then
    echo "    [overhead] configs, logs and wrk output kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# The driver runs in the background so that the trap fires at once on a signal.
python3 "$HERE/overhead.py" --work "$WORK" --nginx "$NGINX_BIN" \
  --cacheroute "$CACHEROUTE_BIN" --vllm-router "$VLLM_ROUTER_BIN" \
  --out-dir "${RESULTS_DIR:-$ROOT/bench-results}" &
DRIVER_PID=$!
set +e
wait "$DRIVER_PID"
rc=$?
set -e
DRIVER_PID=""
exit "$rc"
