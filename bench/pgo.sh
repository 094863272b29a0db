#!/usr/bin/env bash
# A profile-guided build of bosun, to measure how much of its CPU per request
# is code layout (hot paths spread over a large binary) rather than work:
#
#   bench/pgo.sh            -> target/pgo/release/bosun
#   BOSUN=target/pgo/release/bosun bench/run.sh
#
# 1. builds bosun instrumented (-Cprofile-generate) in target/pgo-gen;
# 2. trains it as bench/run.sh's gateway in front of `bosun echo`: HTTP/1.1
#    keep-alive (h2load --h1; GETs, and POSTs with a 200-byte body), HTTP/2
#    (h2load) and new connections (curl),
#    then HTTP/1.1 over TLS termination;
# 3. merges the profile with the toolchain's llvm-profdata (rustup component
#    llvm-tools) and builds with -Cprofile-use in target/pgo.
# The plain `cargo build --release` binary is what CI tests and the figures
# in bench/RESULTS.md are of unless they say PGO.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/bosun-config.sh
. "$ROOT/bench/bosun-config.sh"
PROFDATA=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -1 || true)
if [[ -z $PROFDATA ]]; then
  rustup component add llvm-tools
  PROFDATA=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata | head -1)
fi
DATA=$ROOT/target/pgo-data
rm -rf "$DATA"
mkdir -p "$DATA"
cd "$ROOT"
RUSTFLAGS="-Cprofile-generate=$DATA" CARGO_TARGET_DIR=$ROOT/target/pgo-gen \
  cargo build --release --bin bosun
GEN=$ROOT/target/pgo-gen/release/bosun

UP_PORT=18580 PX_PORT=18582 ADMIN=127.0.0.1:18583
TMP=$(mktemp -d)
trap 'kill $UP $PX 2>/dev/null || true; rm -rf "$TMP"' EXIT
"$GEN" echo --listen "127.0.0.1:$UP_PORT" --name up >/dev/null 2>&1 &
UP=$!
mkdir -p "$TMP/c"
# train SCHEME LOAD...: the gateway (config in $TMP/c) under LOAD, then a
# clean exit, which writes its profile (the echo upstream's is not needed).
train() {
  local scheme=$1
  shift
  "$GEN" proxy --mode gateway --config "$TMP/c" --gateway-address 127.0.0.1 \
    --admin-address "$ADMIN" --workers 1 >/dev/null 2>&1 &
  PX=$!
  bench_wait_http "$scheme://127.0.0.1:$PX_PORT/"
  "$@"
  kill -INT $PX
  wait $PX 2>/dev/null || true
}
head -c 200 /dev/zero | tr '\0' x >"$TMP/body"
plaintext_load() {
  h2load --h1 -n 300000 -c 64 "http://127.0.0.1:$PX_PORT/" | grep 'succeeded'
  # Small POSTs (bench/run.sh BODY_BYTES=200): the lean path's bodies.
  h2load --h1 -n 60000 -c 64 -d "$TMP/body" "http://127.0.0.1:$PX_PORT/" | grep 'succeeded'
  h2load -n 50000 -c 16 -m 8 "http://127.0.0.1:$PX_PORT/" | grep 'succeeded'
  for _ in $(seq 1 200); do curl -s -o /dev/null "http://127.0.0.1:$PX_PORT/"; done
}
bosun_bench_config "$PX_PORT" "$UP_PORT" >"$TMP/c/bench.yaml"
train http plaintext_load
# TLS termination (bench/run.sh TLS=1): the same gateway with a certificate.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$TMP/key.pem" -out "$TMP/cert.pem" -subj /CN=bench.local \
  -addext "subjectAltName=DNS:bench.local,IP:127.0.0.1" >/dev/null 2>&1
BENCH_TLS_CERT=$TMP/cert.pem BENCH_TLS_KEY=$TMP/key.pem \
  bosun_bench_config "$PX_PORT" "$UP_PORT" >"$TMP/c/bench.yaml"
tls_load() {
  h2load --h1 -n 200000 -c 64 "https://127.0.0.1:$PX_PORT/" | grep 'succeeded'
}
train https tls_load
kill -9 $UP 2>/dev/null || true
"$PROFDATA" merge -o "$DATA/merged.profdata" "$DATA"
RUSTFLAGS="-Cprofile-use=$DATA/merged.profdata" CARGO_TARGET_DIR=$ROOT/target/pgo \
  cargo build --release --bin bosun
echo "bench/pgo.sh: $ROOT/target/pgo/release/bosun"
