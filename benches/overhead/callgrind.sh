#!/usr/bin/env bash
# Instructions the gateway spends per plain request, counted by callgrind:
#
#   bash benches/overhead/callgrind.sh [BIN ...]
#
# wrk's requests/s on a shared 2-core host move by ±20 % from run to run;
# callgrind counts user-space instructions, which stay the same whatever else
# the machine does, so two builds can be compared exactly. For each binary
# (default target/release/cacheroute) it starts the static nginx upstream of
# overhead.py, runs `cacheroute gateway` in drop-in mode under
# `valgrind --tool=callgrind`, warms it up, zeroes the counters, drives it with
# wrk (post.lua, 8 connections, DURATION, default 20s), dumps, and prints the
# instructions per request and the share spent in memcpy. Kernel time
# (syscalls) is not counted: measure that with run.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DURATION="${DURATION:-20s}"
for tool in valgrind callgrind_control callgrind_annotate wrk curl; do
  command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is missing (apt-get install -y valgrind wrk curl)" >&2; exit 1; }
done
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
[ -x "$NGINX" ] || { echo "callgrind.sh: nginx is missing (apt-get install -y nginx)" >&2; exit 1; }
[ $# -gt 0 ] || set -- "$ROOT/target/release/cacheroute"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
URL_PATH=/v1/chat/completions
for BIN in "$@"; do
  WORK="$(mktemp -d)"
  UP=$(free_port); GW=$(free_port); CTL=$(free_port)
  sed -e "s#@PORT@#$UP#g" -e "s#@WORK@#$WORK#g" "$HERE/upstream-nginx.conf.in" > "$WORK/up.conf"
  "$NGINX" -p "$WORK/" -e "$WORK/up.err" -c "$WORK/up.conf" & NG_PID=$!
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" --dump-instr=no \
    "$BIN" gateway --upstream "http://127.0.0.1:$UP" --listen "127.0.0.1:$GW" \
    --control "127.0.0.1:$CTL" > "$WORK/gateway.log" 2>&1 & GW_PID=$!
  trap 'kill $GW_PID $NG_PID 2>/dev/null || true' EXIT
  for _ in $(seq 1 240); do
    curl -sf -o /dev/null -X POST -H 'content-type: application/json' \
      -d '{"model":"bench-model","messages":[{"role":"user","content":"hi"}]}' \
      "http://127.0.0.1:$GW$URL_PATH" && break
    sleep 0.5
  done
  wrk -t1 -c8 -d5s -s "$HERE/post.lua" "http://127.0.0.1:$GW$URL_PATH" > /dev/null
  callgrind_control --zero "$GW_PID" > /dev/null 2>&1
  wrk -t1 -c8 -d"$DURATION" -s "$HERE/post.lua" "http://127.0.0.1:$GW$URL_PATH" > "$WORK/wrk.txt"
  callgrind_control --dump "$GW_PID" > /dev/null 2>&1
  kill "$GW_PID" "$NG_PID" 2>/dev/null || true
  wait "$GW_PID" "$NG_PID" 2>/dev/null || true
  trap - EXIT
  python3 - "$BIN" "$WORK" <<'PY'
import glob, re, subprocess, sys
binary, work = sys.argv[1], sys.argv[2]
wrk = open(f"{work}/wrk.txt").read()
m = re.search(r"(\d+) requests in", wrk)
if not m or "Non-2xx" in wrk:
    sys.exit(f"callgrind.sh: wrk did not get only 200s:\n{wrk}")
requests = int(m.group(1))
dump = sorted(glob.glob(f"{work}/cg.out.*"))[0]
out = subprocess.run(["callgrind_annotate", "--threshold=100", dump],
                     capture_output=True, text=True, check=True).stdout
def ir(pattern):
    for line in out.splitlines():
        if re.search(pattern, line):
            return int(line.split()[0].replace(",", ""))
    return 0
total = ir(r"PROGRAM TOTALS")
memcpy = ir(r"__memcpy_avx_unaligned|__memmove_avx_unaligned")
print(f"{binary}: {total / requests:,.0f} instructions per request "
      f"({requests} requests; memcpy {memcpy / total:.1%})")
PY
  rm -rf "$WORK"
done
