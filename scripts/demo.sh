#!/usr/bin/env bash
# The demo: `bash scripts/demo.sh` builds the release binary and runs
# `cacheroute demo` (gateway on 127.0.0.1:7001/7002 and two simulated vLLM
# engines, all in one process). Extra arguments go to `cacheroute demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cmake >/dev/null 2>&1; then
  echo "==> [demo.sh] installing cmake (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends cmake
fi

echo "==> [demo.sh] cargo build --release"
cargo build --release

exec "${CARGO_TARGET_DIR:-target}/release/cacheroute" demo "$@"
