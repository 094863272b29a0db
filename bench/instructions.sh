#!/usr/bin/env bash
# Instructions per request of the proxy, counted by callgrind (deterministic,
# unlike CPU time on a shared VM): a gateway with one worker in front of
# `bosun echo`, keep-alive HTTP/1.1 requests from h2load over 8 connections.
# Start-up is subtracted: one process serves 1,000 requests, another
# 1,000 + N, and the difference is divided by N.
#
#   bench/instructions.sh [N] [ROUTE_LINES]
#   ROUTE_LINES: YAML added to the route (4-space indent), e.g.
#     $'    timeout: 10s\n    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}'
#   BOSUN [target/release/bosun]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/bosun-config.sh
. "$ROOT/bench/bosun-config.sh"
N=${1:-20000}
ROUTE=${2:-}
BOSUN=${BOSUN:-$ROOT/target/release/bosun}
UP_PORT=18380
PX_PORT=18382
ADMIN=127.0.0.1:18383

count() {  # count REQUESTS -> total instructions of the proxy process
  local n=$1 d vp
  d=$(mktemp -d)
  mkdir -p "$d/c"
  bosun_bench_config "$PX_PORT" "$UP_PORT" "$ROUTE" >"$d/c/bench.yaml"
  valgrind --tool=callgrind --callgrind-out-file="$d/cg.out" "$BOSUN" proxy --mode gateway \
    --config "$d/c" --gateway-address 127.0.0.1 --admin-address "$ADMIN" --workers 1 \
    >/dev/null 2>"$d/err" &
  vp=$!
  bench_wait_http "http://127.0.0.1:$PX_PORT/" || true
  h2load --h1 -n "$n" -c 8 "http://127.0.0.1:$PX_PORT/" >"$d/h2load" 2>&1
  grep -q "$n succeeded" "$d/h2load" || { cat "$d/h2load" "$d/err" >&2; exit 1; }
  kill -INT "$vp"
  sleep 1
  kill -INT "$vp" 2>/dev/null || true
  wait "$vp" 2>/dev/null || true
  awk '/^summary:/ {print $2}' "$d/cg.out"
  rm -rf "$d"
}

"$BOSUN" echo --listen "127.0.0.1:$UP_PORT" --name up >/dev/null 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null || true' EXIT
base=$(count 1000)
full=$(count $((N + 1000)))
echo "instructions/request: $(( (full - base) / N ))"
