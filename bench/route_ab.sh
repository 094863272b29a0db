#!/usr/bin/env bash
# A/B of two bosun route configs, interleaved, same machine and load: CPU µs
# per request of the proxy (utime+stime from /proc across a wrk run).
# Issue 11's bar: a route with retries and a timeout configured (no retry
# happening) costs within 5% of one without.
#
#   bench/route_ab.sh [ROUNDS]
#   A_ROUTE / B_ROUTE: YAML lines added to the route (4-space indent)
#   A_BOSUN / B_BOSUN: two binaries to compare (default: $BOSUN for both)
#   WORKERS [1]: the proxy's --workers
#   BOSUN [target/release/bosun]  DURATION [10]  CONNS [64]
#   CPU_LOAD [0] (upstream + wrk)  CPU_PROXY [1] (the proxy)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/bosun-config.sh
. "$ROOT/bench/bosun-config.sh"
ROUNDS=${1:-6}
BOSUN=${BOSUN:-$ROOT/target/release/bosun}
A_BOSUN=${A_BOSUN:-$BOSUN}
B_BOSUN=${B_BOSUN:-$BOSUN}
WORKERS=${WORKERS:-1}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
CPU_LOAD=${CPU_LOAD:-0}
CPU_PROXY=${CPU_PROXY:-1}
A_ROUTE=${A_ROUTE:-$'    retries: {attempts: 0}'}
B_ROUTE=${B_ROUTE:-$'    timeout: 10s\n    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}'}
UP_PORT=18480
PX_PORT=18482
ADMIN=127.0.0.1:18483
TMP=$(mktemp -d)
trap 'kill $UP 2>/dev/null || true; rm -rf "$TMP"' EXIT

taskset -c "$CPU_LOAD" "$BOSUN" echo --listen "127.0.0.1:$UP_PORT" --name up >/dev/null 2>&1 &
UP=$!

ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }  # utime stime

run() {  # run ROUTE BINARY -> "total user" CPU µs per request
  local route=$1 bin=$2 d=$TMP/c pid t0 t1 n hz
  rm -rf "$d"
  mkdir -p "$d"
  bosun_bench_config "$PX_PORT" "$UP_PORT" "$route" >"$d/bench.yaml"
  taskset -c "$CPU_PROXY" "$bin" proxy --mode gateway --config "$d" \
    --gateway-address 127.0.0.1 --admin-address "$ADMIN" --workers "$WORKERS" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 50); do
    curl -s -o /dev/null "http://127.0.0.1:$PX_PORT/" && break
    sleep 0.1
  done
  taskset -c "$CPU_LOAD" wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$PX_PORT/" >/dev/null
  t0=$(ticks $pid)
  n=$(taskset -c "$CPU_LOAD" wrk -t1 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:$PX_PORT/" |
    awk '/requests in/ {print $1}')
  t1=$(ticks $pid)
  kill -INT $pid
  wait $pid 2>/dev/null || true
  hz=$(getconf CLK_TCK)
  awk -v a="$t0" -v b="$t1" -v hz="$hz" -v n="$n" 'BEGIN {
    split(a, x, " "); split(b, y, " ");
    u = y[1] - x[1]; s = y[2] - x[2];
    printf "%.2f %.2f\n", (u + s) / hz * 1e6 / n, u / hz * 1e6 / n }'
}

a=() b=() au=() bu=()
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then
    read -r x xu < <(run "$A_ROUTE" "$A_BOSUN"); read -r y yu < <(run "$B_ROUTE" "$B_BOSUN")
  else
    read -r y yu < <(run "$B_ROUTE" "$B_BOSUN"); read -r x xu < <(run "$A_ROUTE" "$A_BOSUN")
  fi
  a+=("$x") au+=("$xu") b+=("$y") bu+=("$yu")
  echo "round $r: A $x µs/req (user $xu), B $y µs/req (user $yu)" >&2
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
minimum() { printf '%s\n' "$@" | sort -n | head -1; }
for what in total user; do
  if [ $what = total ]; then xs=("${a[@]}") ys=("${b[@]}"); else xs=("${au[@]}") ys=("${bu[@]}"); fi
  ma=$(median "${xs[@]}") mb=$(median "${ys[@]}") na=$(minimum "${xs[@]}") nb=$(minimum "${ys[@]}")
  awk -v w=$what -v ma="$ma" -v mb="$mb" -v na="$na" -v nb="$nb" 'BEGIN {
    printf "%s CPU µs/req: A median %.2f min %.2f; B median %.2f min %.2f; B/A median %.3f, min %.3f\n",
      w, ma, na, mb, nb, mb / ma, nb / na }'
done
