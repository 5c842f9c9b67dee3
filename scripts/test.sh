#!/usr/bin/env bash
# The test command: `bash scripts/test.sh` (CI runs exactly this via .ci/run).
#
# On a fresh Debian machine with the Rust toolchain, gcc and Python 3 + pip,
# it installs what is missing (cmake, redis-server, chromium and chromium-driver,
# nodejs and npm from apt; the Python packages openai, httpx, prometheus-client,
# pytest, selenium (the dashboard's browser test), matplotlib and tqdm for the
# RAG bench test, langchain-openai, tokenizers and pyyaml from pip; the openai npm
# package with `npm ci` in tests/npm), builds the workspace (dev profile),
# installs AIPerf in its own venv under the target directory, runs the Rust
# tests, then the end-to-end suite in tests/ against the freshly built binary.
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> [test.sh] %s\n' "$*"; }
die() { printf '\n==> [test.sh] FAILED: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root to run: $*"; fi
}

# --- system packages -------------------------------------------------------
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# the dashboard's browser test (tests/test_webui.py): headless Chromium + its driver
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
# the openai npm package's test (tests/test_compat_npm.py)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- Python packages ---------------------------------------------------------
PY=${PYTHON:-python3}
pip_missing=()
for pair in openai:openai httpx:httpx prometheus_client:prometheus-client pytest:pytest \
    matplotlib:matplotlib tqdm:tqdm selenium:selenium langchain_openai:langchain-openai tokenizers:tokenizers yaml:pyyaml; do
  "$PY" -c "import ${pair%%:*}" >/dev/null 2>&1 || pip_missing+=("${pair#*:}")
done
if [ ${#pip_missing[@]} -gt 0 ]; then
  step "installing Python packages: ${pip_missing[*]} (pip)"
  "$PY" -m pip install -q "${pip_missing[@]}" \
    || "$PY" -m pip install -q --break-system-packages "${pip_missing[@]}" \
    || die "pip install ${pip_missing[*]}"
fi

# --- npm packages (tests/npm: the openai package, pinned by package-lock.json) ---
step "npm ci (tests/npm)"
(cd tests/npm && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci in tests/npm"

# --- build ---------------------------------------------------------------------
step "cargo build --workspace --all-targets"
cargo build --workspace --all-targets || die "cargo build"

TARGET_DIR=$(cargo metadata --format-version 1 --no-deps \
  | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
export CACHEROUTE_BIN="$TARGET_DIR/debug/cacheroute"
[ -x "$CACHEROUTE_BIN" ] || die "binary not found: $CACHEROUTE_BIN"

# --- AIPerf (tests/test_compat_aiperf.py) ---------------------------------------
# In its own virtual environment: its pins (transformers, pandas, numpy, ...)
# must not move the system packages. About 1.2 GB and 2-3 minutes on a clean
# machine; kept between runs in the target directory. If it cannot be installed
# the test is skipped, saying so.
AIPERF_VERSION=0.13.0
AIPERF_VENV="$TARGET_DIR/compat-venv"
export AIPERF_BIN="$AIPERF_VENV/bin/aiperf"
if ! "$AIPERF_BIN" --version 2>/dev/null | grep -qx "$AIPERF_VERSION"; then
  step "installing AIPerf $AIPERF_VERSION into $AIPERF_VENV (pip)"
  rm -rf "$AIPERF_VENV"
  if ! { "$PY" -m venv "$AIPERF_VENV" \
         && timeout 900 "$AIPERF_VENV/bin/pip" install -q --disable-pip-version-check "aiperf==$AIPERF_VERSION"; }; then
    printf '\n==> [test.sh] WARNING: AIPerf could not be installed; tests/test_compat_aiperf.py will be skipped\n' >&2
    rm -rf "$AIPERF_VENV"
  fi
fi

# --- tests -----------------------------------------------------------------------
failed=()

step "cargo test --workspace"
cargo test --workspace || failed+=("cargo test")

step "end-to-end suite: $PY -m pytest -q tests/ (CACHEROUTE_BIN=$CACHEROUTE_BIN)"
export PYTHONDONTWRITEBYTECODE=1
set +e
timeout 1200 "$PY" -m pytest -q tests/
rc=$?
set -e
case $rc in
  0) ;;
  5) failed+=("pytest (no test was collected)") ;;
  124) failed+=("pytest (timed out)") ;;
  *) failed+=("pytest (exit $rc)") ;;
esac

if [ ${#failed[@]} -gt 0 ]; then
  die "${failed[*]}"
fi
