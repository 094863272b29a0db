#!/usr/bin/env bash
# The cost of mutual TLS between two proxies, beside nginx doing the same.
#
#   wrk/h2load -> A (plain HTTP in) -> B -> upstream nginx ("ok")
#
# Setups, each a fresh pair of processes, all in one run, $ROUNDS rounds
# with the order rotated:
#   direct       wrk -> upstream (the baseline for "added" latency)
#   bosun-plain  two Bosun sidecars, plaintext between them
#   bosun-mtls   two Bosun sidecars, Istio mutual TLS between them (certs from
#                openssl via --cert-dir, auto mTLS by the endpoint's label)
#   nginx-mtls   nginx A proxy_pass https:// with proxy_ssl_certificate (mutual
#                TLS, keepalive upstream, session reuse) -> nginx B (ssl,
#                ssl_verify_client on) -> upstream
#
# Per setup: wrk saturation (rps; CPU µs per request of A+B together, from
# /proc), h2load at $LAT_RPS (p50/p99; "added p99" = p99 minus direct's),
# and for the TLS setups B's full handshakes per CPU-second (openssl s_time
# -new, TLS 1.3, client certificate included) and resumed ones (s_time
# -reuse, TLS 1.2 session tickets).
# Pinning: A and B on $CPU_PROXY, upstream and load on $CPU_LOAD.
# (h2load sets the Host by :authority: with -H "Host: ..." it spins at
# 100% CPU until killed, nghttp2 1.52.)
# Knobs: ROUNDS [3] DURATION [8] LAT_DURATION [8] CONNS [32] LAT_RPS [1000]
#        LAT_CONNS [10] HS_SECONDS [4] CPU_LOAD [0] CPU_PROXY [1] BOSUN
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
LAT_DURATION=${LAT_DURATION:-8}
CONNS=${CONNS:-32}
LAT_RPS=${LAT_RPS:-1000}
LAT_CONNS=${LAT_CONNS:-10}
HS_SECONDS=${HS_SECONDS:-4}
CPU_LOAD=${CPU_LOAD:-0}
CPU_PROXY=${CPU_PROXY:-1}
BOSUN=${BOSUN:-$ROOT/target/release/bosun}
OUT_MD=${OUT_MD:-$ROOT/bench/last-mtls.md}
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf '[mtls %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
for c in nginx wrk h2load openssl curl taskset; do
  command -v "$c" >/dev/null || die "$c is needed (apt-get install nginx wrk nghttp2-client openssl curl util-linux)"
done
[[ -x $BOSUN ]] || (cd "$ROOT" && cargo build --release)
CLK_TCK=$(getconf CLK_TCK)
TMP=$(mktemp -d /tmp/bosun-mtls.XXXXXX)
chmod 755 "$TMP"
cleanup() {
  # Every process of the run names a file under $TMP.
  pkill -f "$TMP" 2>/dev/null || true
  sleep 0.3
  pkill -9 -f "$TMP" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

A=18001 B=18002 UP=18080
HOST=reviews.default.svc.cluster.local:9080

cpu_ticks() {  # sum of utime+stime over PIDs (and their threads)
  local t=0 p f
  for p in "$@"; do
    read -ra f <<<"$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null)" || continue
    t=$(( t + f[11] + f[12] ))
  done
  echo "$t"
}

# ---------------------------------------------------------------- certificates
pki() {
  local d=$TMP/pki
  mkdir -p "$d"
  (cd "$d"
   openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key \
     -out ca.pem -days 2 -subj /CN=bench-root 2>/dev/null
   for w in a:productpage b:reviews; do
     n=${w%%:*} sa=${w#*:}
     mkdir -p "$n"
     printf 'subjectAltName=URI:spiffe://cluster.local/ns/default/sa/%s,DNS:%s.local\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n' "$sa" "$n" >"$n.ext"
     openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$n/key.pem" \
       -out "$n.csr" -subj "/CN=$n" 2>/dev/null
     openssl x509 -req -in "$n.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
       -extfile "$n.ext" -out "$n/cert-chain.pem" 2>/dev/null
     cp ca.pem "$n/root-cert.pem"
   done)
}

# ---------------------------------------------------------------- configs
nginx_base() {  # nginx_base DIR
  cat <<EOF
daemon off;
master_process on;
worker_processes 1;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $1/cb; proxy_temp_path $1/px; fastcgi_temp_path $1/fc;
  uwsgi_temp_path $1/uw; scgi_temp_path $1/sc;
EOF
}

write_configs() {
  local d
  d=$TMP/upstream; mkdir -p "$d"
  { nginx_base "$d"; echo "  server { listen 127.0.0.1:$UP; location / { return 200 \"ok\n\"; } } }"; } >"$d/nginx.conf"
  d=$TMP/nginx-a; mkdir -p "$d"
  { nginx_base "$d"; cat <<EOF
  upstream b { server 127.0.0.1:$B; keepalive 64; }
  server {
    listen 127.0.0.1:$A;
    location / {
      proxy_pass https://b;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_certificate $TMP/pki/a/cert-chain.pem;
      proxy_ssl_certificate_key $TMP/pki/a/key.pem;
      proxy_ssl_trusted_certificate $TMP/pki/ca.pem;
      proxy_ssl_verify on;
      proxy_ssl_name b.local;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
    }
  }
}
EOF
  } >"$d/nginx.conf"
  d=$TMP/nginx-b; mkdir -p "$d"
  { nginx_base "$d"; cat <<EOF
  upstream app { server 127.0.0.1:$UP; keepalive 64; }
  ssl_session_cache shared:SSL:10m;
  server {
    listen 127.0.0.1:$B ssl;
    ssl_certificate $TMP/pki/b/cert-chain.pem;
    ssl_certificate_key $TMP/pki/b/key.pem;
    ssl_client_certificate $TMP/pki/ca.pem;
    ssl_verify_client on;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
  } >"$d/nginx.conf"
  for mode in plain mtls; do
    d=$TMP/bosun-$mode; mkdir -p "$d"
    local label=""
    [[ $mode == mtls ]] && label=", security.istio.io/tlsMode: istio"
    cat >"$d/mesh.yaml" <<EOF
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  resolution: STATIC
  ports:
  - {number: 9080, name: http, protocol: HTTP}
  endpoints:
  - address: 127.0.0.1
    ports: {http: $B}
    serviceAccount: reviews
    labels: {app: reviews$label}
EOF
  done
}

start() {  # start NAME CORE CMD...: background, pinned; echoes the PID
  local name=$1 core=$2; shift 2
  taskset -c "$core" "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" &
  echo $!
}

wait_200() {  # wait_200 URL [HOST]
  local i code
  for ((i = 0; i < 100; i++)); do
    code=$(curl -s -o /dev/null -m 1 -w '%{http_code}' -H "Host: ${2:-x}" "$1" || true)
    [[ $code == 200 ]] && return 0
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- one setup
declare -A RPS CPU P50 P99 HS HSR
run_setup() {  # run_setup NAME ROUND
  local name=$1 r=$2 pids=() url="http://127.0.0.1:$A/" k="$1:$2"
  case $name in
    direct) url="http://127.0.0.1:$UP/" ;;
    bosun-*)
      local mode=${name#bosun-}
      pids+=("$(start "$name-b" "$CPU_PROXY" "$BOSUN" proxy --mode sidecar --workers 1 \
        --config "$TMP/bosun-$mode" --cert-dir "$TMP/pki/b" --app-port "$UP" \
        --inbound-address "127.0.0.1:$B" --outbound-address 127.0.0.2:15001 \
        --admin-address 127.0.0.1:15101 --service-account reviews)")
      pids+=("$(start "$name-a" "$CPU_PROXY" "$BOSUN" proxy --mode sidecar --workers 1 \
        --config "$TMP/bosun-$mode" --cert-dir "$TMP/pki/a" \
        --outbound-address "127.0.0.1:$A" --admin-address 127.0.0.1:15100)")
      ;;
    nginx-mtls)
      pids+=("$(start nginx-b "$CPU_PROXY" nginx -c "$TMP/nginx-b/nginx.conf" -p "$TMP/nginx-b")")
      pids+=("$(start nginx-a "$CPU_PROXY" nginx -c "$TMP/nginx-a/nginx.conf" -p "$TMP/nginx-a")")
      ;;
  esac
  wait_200 "$url" "$HOST" || die "$name did not answer 200 (see $TMP/$name-*.err)"
  sleep 0.5
  local all=() p
  for p in "${pids[@]}"; do all+=("$p" $(pgrep -P "$p" || true)); done
  # Saturation: rps, CPU per request of A+B.
  taskset -c "$CPU_LOAD" wrk -t1 -c"$CONNS" -d2s -H "Host: $HOST" "$url" >/dev/null
  local t0 t1 out reqs
  t0=$(cpu_ticks "${all[@]}")
  out=$(taskset -c "$CPU_LOAD" wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "Host: $HOST" "$url")
  t1=$(cpu_ticks "${all[@]}")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  RPS[$k]=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
  if ((${#all[@]})); then
    CPU[$k]=$(awk -v t=$((t1 - t0)) -v n="$reqs" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
  else
    CPU[$k]=-
  fi
  grep -q "Non-2xx\|Socket errors" <<<"$out" && log "$name: wrk errors: $out"
  # Fixed rate latency.
  local hlog=$TMP/$name.$r.tsv
  taskset -c "$CPU_LOAD" h2load --h1 -t1 -c "$LAT_CONNS" --rps $((LAT_RPS / LAT_CONNS)) \
    -D "$LAT_DURATION" -H ":authority: $HOST" --log-file="$hlog" "$url" >/dev/null 2>&1 || true
  read -r P50[$k] P99[$k] < <(awk -F'\t' '$2 == 200 { print $3 }' "$hlog" | sort -n | awk '
      { v[NR] = $1 } END { if (NR == 0) { print "NaN NaN"; exit }
      i = int(NR * 0.5); if (i < NR * 0.5) i++; j = int(NR * 0.99); if (j < NR * 0.99) j++
      print v[i], v[j] }')
  # Handshakes on B: full, then resumed, per CPU-second of B.
  HS[$k]=- HSR[$k]=-
  if [[ $name != direct && $name != bosun-plain ]]; then
    local bpids=("${all[@]:0:2}") mode n
    for mode in new reuse; do
      # Resumed: TLS 1.2 (session tickets inside the handshake). s_time does
      # not wait for TLS 1.3's post-handshake tickets, so it would resume
      # only by luck of timing there.
      local ver=()
      [[ $mode == reuse ]] && ver=(-tls1_2)
      t0=$(cpu_ticks "${bpids[@]}")
      n=$(taskset -c "$CPU_LOAD" openssl s_time -connect "127.0.0.1:$B" -"$mode" "${ver[@]}" \
            -cert "$TMP/pki/a/cert-chain.pem" -key "$TMP/pki/a/key.pem" -time "$HS_SECONDS" 2>/dev/null \
          | awk '/connections in/ && /real seconds/ {print $1; exit}')
      t1=$(cpu_ticks "${bpids[@]}")
      local v
      v=$(awk -v n="${n:-0}" -v t=$((t1 - t0)) -v hz="$CLK_TCK" 'BEGIN { if (t == 0) print "-"; else printf "%.0f", n / (t / hz) }')
      if [[ $mode == new ]]; then HS[$k]=$v; else HSR[$k]=$v; fi
    done
  fi
  log "$name round $r: ${RPS[$k]} rps, ${CPU[$k]} µs/req (A+B), p50 ${P50[$k]}µs p99 ${P99[$k]}µs, handshakes/core-s ${HS[$k]} (resumed ${HSR[$k]})"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  sleep 0.5
}

pki
write_configs
UPID=$(start upstream "$CPU_LOAD" nginx -c "$TMP/upstream/nginx.conf" -p "$TMP/upstream")
wait_200 "http://127.0.0.1:$UP/" || die "upstream nginx did not start"
SETUPS=(direct bosun-plain bosun-mtls nginx-mtls)
for ((r = 1; r <= ROUNDS; r++)); do
  for ((i = 0; i < ${#SETUPS[@]}; i++)); do
    run_setup "${SETUPS[(i + r - 1) % ${#SETUPS[@]}]}" "$r"
  done
done

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else print v[int((NR + 1) / 2)] }'; }
med() {  # med ARRAY SETUP
  local -n arr=$1
  local r
  for ((r = 1; r <= ROUNDS; r++)); do echo "${arr[$2:$r]}"; done | grep -v '^-$' | median
}
base99=$(med P99 direct)
{
  echo "# mTLS between two proxies ($(date -u +%Y-%m-%d), $(nproc) cores: proxies on core $CPU_PROXY, upstream and load on $CPU_LOAD)"
  echo
  echo "Medians of $ROUNDS rounds. CPU is A+B together per request (wrk -c$CONNS, ${DURATION}s); latency from h2load at $LAT_RPS rps over $LAT_CONNS connections; handshakes are B's per CPU-second (openssl s_time with a client certificate, ${HS_SECONDS}s; full: TLS 1.3, resumed: TLS 1.2 tickets)."
  echo
  echo "| setup | rps | CPU µs/req | p50 µs | p99 µs | added p99 µs | full handshakes/core-s | resumed/core-s |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for s in "${SETUPS[@]}"; do
    p99=$(med P99 "$s")
    added=$(awk -v a="$p99" -v b="$base99" 'BEGIN { if (a == "-" || b == "-") print "-"; else print a - b }')
    echo "| $s | $(med RPS "$s") | $(med CPU "$s") | $(med P50 "$s") | $p99 | $added | $(med HS "$s") | $(med HSR "$s") |"
  done
  echo
  echo "Versions: $("$BOSUN" --version), $(nginx -v 2>&1), $(openssl version)."
} | tee "$OUT_MD"
