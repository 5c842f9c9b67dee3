#!/usr/bin/env bash
# A load tool of the ecosystem against the demo: AIPerf, a fixed run of 100 chat
# requests streamed with per-chunk usage (256 synthetic input tokens, 32 output
# tokens, concurrency 4, the server's token counts), offline with the repo's
# Llama-3 tokenizer. Then benches/compat/aiperf_check.py reads AIPerf's own
# output files: every request answered 200, and the input length AIPerf reports
# for each request equals the real Llama-3 token count of the prompt it sent.
# The figures it prints are the README's (section "Compatibility").
#
# tests/test_compat_aiperf.py runs the same check, shorter, in CI.
#
#   cargo build && bash benches/compat/run.sh
#   REQUESTS=200 CONCURRENCY=8 bash benches/compat/run.sh
#
# AIPerf installs into its own virtual environment ($VENV, the one
# scripts/test.sh makes): about 1.2 GB, no torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${CACHEROUTE_BIN:-target/debug/cacheroute}
VENV=${VENV:-target/compat-venv}
AIPERF_VERSION=0.13.0
OUT=${OUT:-benches/results/compat}
REQUESTS=${REQUESTS:-100}
CONCURRENCY=${CONCURRENCY:-4}
ISL=${ISL:-256}
OSL=${OSL:-32}
PORT=${PORT:-17301}
mkdir -p "$OUT"

[ -x "$BIN" ] || { echo "no $BIN: cargo build first" >&2; exit 1; }
if ! "$VENV/bin/aiperf" --version 2>/dev/null | grep -qx "$AIPERF_VERSION"; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "aiperf==$AIPERF_VERSION"
fi

# AIPerf's offline mode reads tokenizers only from the Hub cache: lay the repo's
# copy of Meta's tokenizer out as that entry (the revision its hashes match).
HUB=$(mktemp -d)
REV=8afb486c1db24fe5011ec46dfbe5b5dccdb575c2
ENTRY="$HUB/models--meta-llama--Meta-Llama-3-8B-Instruct"
mkdir -p "$ENTRY/refs" "$ENTRY/snapshots/$REV"
printf '%s' "$REV" > "$ENTRY/refs/main"
cp conf/tokenizers/llama3/tokenizer.json conf/tokenizers/llama3/tokenizer_config.json "$ENTRY/snapshots/$REV/"

"$BIN" demo --listen "127.0.0.1:$PORT" --control "127.0.0.1:$((PORT + 1))" \
  --sim-port $((PORT + 10)) --kdn-listen "127.0.0.1:$((PORT + 20))" --time-scale 20 \
  > "$OUT/demo.log" 2>&1 &
DEMO=$!
trap 'kill $DEMO 2>/dev/null || true; rm -rf "$HUB"' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" | grep -q llama3-8b && break
  sleep 0.5
done

rm -rf "$OUT/aiperf"
HF_HUB_OFFLINE=1 HF_HUB_CACHE="$HUB" HF_HUB_DISABLE_TELEMETRY=1 \
"$VENV/bin/aiperf" profile --model llama3-8b --url "http://127.0.0.1:$PORT" \
  --endpoint-type chat --streaming --tokenizer meta-llama/Meta-Llama-3-8B-Instruct \
  --synthetic-input-tokens-mean "$ISL" --synthetic-input-tokens-stddev 0 \
  --output-tokens-mean "$OSL" --output-tokens-stddev 0 \
  --request-count "$REQUESTS" --concurrency "$CONCURRENCY" --random-seed 7 \
  --use-server-token-count --per-chunk-usage \
  --export-level raw --artifact-dir "$OUT/aiperf" --no-auto-plot | tee "$OUT/aiperf.txt"

python3 benches/compat/aiperf_check.py "$OUT/aiperf" --requests "$REQUESTS" --osl "$OSL" \
  | tee "$OUT/aiperf-check.txt"
