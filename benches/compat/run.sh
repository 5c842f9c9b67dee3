#!/usr/bin/env bash
# A load tool of the ecosystem against the demo: GuideLLM, a short fixed run of
# 100 synchronous chat requests (256 prompt tokens, 32 output tokens, Meta's
# Llama-3 tokenizer), then the check that every request was answered 200 (the
# gateway's own counts). GuideLLM's report (guidellm.txt, guidellm.json) shows
# the input lengths the server reported next to the 256 tokens it generated.
#
# Not part of scripts/test.sh: GuideLLM pulls in torch and CUDA wheels (several
# GB). It installs into its own virtual environment ($VENV).
#
#   bash benches/compat/run.sh            # build first: cargo build --release
#   CACHEROUTE_BIN=target/debug/cacheroute bash benches/compat/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${CACHEROUTE_BIN:-target/release/cacheroute}
VENV=${VENV:-/tmp/cacheroute-compat-venv}
OUT=${OUT:-benches/results/compat}
REQUESTS=${REQUESTS:-100}
PORT=${PORT:-17301}
mkdir -p "$OUT"

[ -x "$BIN" ] || { echo "no $BIN: cargo build --release first" >&2; exit 1; }
if [ ! -x "$VENV/bin/guidellm" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "guidellm==0.8.1"
fi

"$BIN" demo --listen "127.0.0.1:$PORT" --control "127.0.0.1:$((PORT + 1))" \
  --sim-port $((PORT + 10)) --kdn-listen "127.0.0.1:$((PORT + 20))" --time-scale 20 \
  > "$OUT/demo.log" 2>&1 &
DEMO=$!
trap 'kill $DEMO 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" | grep -q llama3-8b && break
  sleep 0.5
done

"$VENV/bin/guidellm" benchmark \
  --target "http://127.0.0.1:$PORT" --model llama3-8b \
  --processor conf/tokenizers/llama3 \
  --data "prompt_tokens=256,output_tokens=32" \
  --rate-type synchronous --max-requests "$REQUESTS" \
  --output-path "$OUT/guidellm.json" | tee "$OUT/guidellm.txt"

# The gateway's own count of what it answered, by status.
curl -s "http://127.0.0.1:$((PORT + 1))/metrics" > "$OUT/gateway-metrics.txt"
python3 - "$OUT/gateway-metrics.txt" "$REQUESTS" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
by_status = {}
for m in re.finditer(r'^cacheroute_requests_total\{([^}]*)\} (\S+)$', text, re.M):
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
    if labels.get("route") in ("chat", "completions"):
        by_status[labels["status"]] = by_status.get(labels["status"], 0) + float(m.group(2))
print("gateway answers by status:", by_status)
ok = by_status.get("200", 0)
bad = sum(v for k, v in by_status.items() if k != "200")
assert bad == 0 and ok >= int(sys.argv[2]), "some requests failed"
print(f"{int(ok)} requests, all 200")
PY
