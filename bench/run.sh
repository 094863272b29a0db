#!/usr/bin/env bash
# Bosun vs nginx vs haproxy, same machine, same load, $ROUNDS interleaved rounds.
#
#   cores $CPU_LOAD  : upstream nginx ($UPSTREAM_WORKERS workers) + load generator
#                      (wrk / h2load, $LOAD_THREADS threads)
#   cores $CPU_PROXY : the proxy under test, $WORKERS workers (nginx
#                      worker_processes, haproxy nbthread, bosun --workers)
#
# The 4-worker comparison on a machine with the cores, e.g.:
#   WORKERS=4 CPU_PROXY=10-13 CPU_LOAD=0-9 UPSTREAM_WORKERS=6 LOAD_THREADS=4 bench/run.sh
#
# Per proxy: wrk saturation (rps, p50/p99), h2load at a fixed $LAT_RPS
# (p50/p99 from h2load's per-request log), proxy CPU µs per request
# (utime+stime from /proc/PID/stat across the wrk run, also split into user
# and sys) and RSS (VmRSS).
#
# Every round runs each proxy once (fresh process); the order is rotated by one
# each round (nginx haproxy bosun / haproxy bosun nginx / bosun nginx haproxy)
# so slow drift of the machine favours no proxy. The table shows the median of
# each figure over the rounds; Details shows the min-max range of CPU µs/req and
# of p99 at $LAT_RPS rps, and the p99 of all rounds' requests pooled.
#
# See bench/README.md. Environment knobs (defaults in brackets):
#   ROUNDS [3]         interleaved rounds; the table reports medians over them
#   DURATION [10]      wrk saturation run, seconds
#   LAT_DURATION [10]  h2load fixed-rate run, seconds
#   WARMUP [2]         wrk warm-up before each saturation run, seconds
#   CONNS [64]         wrk connections
#   LAT_RPS [1000]     total request rate of the latency run
#   LAT_CONNS [10]     h2load connections (per-connection rate = LAT_RPS/LAT_CONNS)
#   PROXIES ["nginx haproxy bosun"]  which proxies to run, in round-1 order
#   SKIP_BOSUN [0]     1 = drop bosun from PROXIES
#   BOSUN [target/release/bosun]     bosun binary (built with cargo if missing)
#   BOSUN_EXTRA_ARGS [] extra args appended to the bosun command line
#   BOSUN_ROUTE [] YAML lines added to bosun's route (4-space indent), e.g.
#                  "    timeout: 10s" (issue 11's retries+timeout comparison)
#   CPU_LOAD [0] CPU_PROXY [1]       cores used for pinning (taskset lists: 0, 0-3, 0,2)
#   WORKERS [1]        the proxies' worker processes / threads
#   UPSTREAM_WORKERS [1]  the upstream nginx's worker processes
#   LOAD_THREADS [1]   wrk and h2load threads
#   TLS [0]            1 = the proxies terminate TLS (a self-signed P-256
#                      certificate made with openssl; TLS 1.3, session
#                      resumption as each does by default); plaintext upstream
#   BODY_BYTES [0]     > 0 = every request is a POST with a body of that
#                      many bytes (Content-Length), wrk and h2load alike
#   KEEP_TMP [0]       1 = keep the temp dir (configs, logs, h2load logs)
#   NO_INSTALL [0]     1 = never call apt-get
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/bosun-config.sh
. "$ROOT/bench/bosun-config.sh"
OUT_MD="$ROOT/bench/last-run.md"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
LAT_DURATION=${LAT_DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
LAT_RPS=${LAT_RPS:-1000}
LAT_CONNS=${LAT_CONNS:-10}
PROXIES=${PROXIES:-nginx haproxy bosun}
SKIP_BOSUN=${SKIP_BOSUN:-0}
BOSUN_DEFAULT="$ROOT/target/release/bosun"
BOSUN=${BOSUN:-$BOSUN_DEFAULT}
BOSUN_EXTRA_ARGS=${BOSUN_EXTRA_ARGS:-}
BOSUN_ROUTE=${BOSUN_ROUTE:-}
CPU_LOAD=${CPU_LOAD:-0}
CPU_PROXY=${CPU_PROXY:-1}
WORKERS=${WORKERS:-1}
UPSTREAM_WORKERS=${UPSTREAM_WORKERS:-1}
LOAD_THREADS=${LOAD_THREADS:-1}
TLS=${TLS:-0}
KEEP_TMP=${KEEP_TMP:-0}
BODY_BYTES=${BODY_BYTES:-0}
NO_INSTALL=${NO_INSTALL:-0}

PROXY_PORT=18000
UPSTREAM_PORT=18080
ADMIN_ADDR=127.0.0.1:15000
SCHEME=http
[[ $TLS == 1 ]] && SCHEME=https
URL="$SCHEME://127.0.0.1:$PROXY_PORT/"

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [[ $SKIP_BOSUN == 1 ]]; then
  PROXIES=$(printf '%s\n' $PROXIES | grep -vx bosun | tr '\n' ' ' || true)
fi
[[ -n ${PROXIES// /} ]] || die "no proxies selected"
[[ $ROUNDS =~ ^[0-9]+$ ]] && (( 10#$ROUNDS >= 1 )) || die "ROUNDS must be a positive integer (got '$ROUNDS')"
ROUNDS=$(( 10#$ROUNDS ))
read -ra PROXY_LIST <<<"$PROXIES"
PROXIES="${PROXY_LIST[*]}"
(( LAT_RPS % LAT_CONNS == 0 )) || die "LAT_RPS ($LAT_RPS) must be a multiple of LAT_CONNS ($LAT_CONNS)"
LAT_RPS_PER_CONN=$(( LAT_RPS / LAT_CONNS ))

# ---------------------------------------------------------------- packages
need_pkgs=()
command -v nginx   >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]]   || need_pkgs+=(nginx)
command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || need_pkgs+=(haproxy)
command -v wrk     >/dev/null 2>&1 || need_pkgs+=(wrk)
command -v h2load  >/dev/null 2>&1 || need_pkgs+=(nghttp2-client)
command -v curl    >/dev/null 2>&1 || need_pkgs+=(curl)
command -v taskset >/dev/null 2>&1 || need_pkgs+=(util-linux)
command -v pgrep   >/dev/null 2>&1 || need_pkgs+=(procps)
if (( ${#need_pkgs[@]} )); then
  [[ $NO_INSTALL == 1 ]] && die "missing packages: ${need_pkgs[*]} (NO_INSTALL=1)"
  SUDO=()
  if (( EUID != 0 )); then
    command -v sudo >/dev/null 2>&1 || die "missing packages ${need_pkgs[*]}; run as root or install them"
    SUDO=(sudo)
  fi
  log "installing: ${need_pkgs[*]}"
  # DPkg::Lock::Timeout waits for a concurrent apt/dpkg instead of failing.
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
    install -y -q --no-install-recommends "${need_pkgs[@]}"
fi
export PATH="$PATH:/usr/sbin:/sbin"

NCPU=$(getconf _NPROCESSORS_ONLN)
(( NCPU >= 2 )) || die "need at least 2 CPUs (have $NCPU)"
CLK_TCK=$(getconf CLK_TCK)
LOADAVG=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$LOADAVG" 'BEGIN { exit !(l > 0.5) }'; then
  log "WARNING: load average is $LOADAVG before the run; other processes will skew the results"
fi

# --------------------------------------------------------------- bosun binary
if [[ " $PROXIES " == *" bosun "* && ! -x $BOSUN ]]; then
  if [[ $BOSUN == "$BOSUN_DEFAULT" ]]; then
    command -v cargo >/dev/null 2>&1 || die "$BOSUN missing and cargo not found (or set SKIP_BOSUN=1)"
    log "bosun binary missing; cargo build --release"
    (cd "$ROOT" && cargo build --release)
  fi
  [[ -x $BOSUN ]] || die "bosun binary not found: $BOSUN"
fi

# ------------------------------------------------------------- temp + cleanup
TMP=$(mktemp -d /tmp/bosun-bench.XXXXXX)
chmod 755 "$TMP"   # nginx workers may run as nobody
STARTED_PIDS=()

# Requests with a body: the same bytes from wrk (a script) and h2load (-d).
WRK_BODY=() H2_BODY=() REQUESTS="GET"
if [[ $BODY_BYTES =~ ^[0-9]+$ ]] && (( BODY_BYTES > 0 )); then
  head -c "$BODY_BYTES" /dev/zero | tr '\0' x >"$TMP/body"
  cat >"$TMP/post.lua" <<EOF
wrk.method = "POST"
wrk.body = string.rep("x", $BODY_BYTES)
wrk.headers["Content-Type"] = "application/octet-stream"
EOF
  WRK_BODY=(-s "$TMP/post.lua") H2_BODY=(-d "$TMP/body")
  REQUESTS="POST with a $BODY_BYTES-byte body (Content-Length)"
fi

stop_pid() {  # stop_pid PID: TERM, wait up to 5 s, then KILL
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? pid
  set +e
  for pid in "${STARTED_PIDS[@]}"; do stop_pid "$pid"; done
  if [[ $KEEP_TMP == 1 ]]; then
    log "temp dir kept: $TMP"
  else
    rm -rf "$TMP"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [[ $TLS == 1 ]]; then
  command -v openssl >/dev/null 2>&1 || die "TLS=1 needs openssl"
  mkdir -p "$TMP/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$TMP/tls/key.pem" -out "$TMP/tls/cert.pem" -subj /CN=bench.local \
    -addext "subjectAltName=DNS:bench.local,IP:127.0.0.1" >/dev/null 2>&1 || die "openssl failed"
  cat "$TMP/tls/cert.pem" "$TMP/tls/key.pem" >"$TMP/tls/combined.pem"
  chmod 644 "$TMP/tls/"*.pem
  export BENCH_TLS_CERT=$TMP/tls/cert.pem BENCH_TLS_KEY=$TMP/tls/key.pem
fi
for p in $PROXY_PORT $UPSTREAM_PORT ${ADMIN_ADDR##*:}; do
  port_busy "$p" && die "port $p is already in use on 127.0.0.1"
done

# ------------------------------------------------------------------- helpers
# All PIDs of a process tree (root first).
tree_pids() {
  local p=$1 c
  [[ -d /proc/$p ]] || return 0
  echo "$p"
  for c in $(pgrep -P "$p" 2>/dev/null || true); do tree_pids "$c"; done
}

# utime and stime (clock ticks), each summed over the given PIDs, all threads
# included. Prints "UTIME STIME".
cpu_ticks() {
  local u=0 st=0 p stat rest f
  for p in "$@"; do
    stat=$(<"/proc/$p/stat") 2>/dev/null || continue
    rest=${stat##*) }          # strip "pid (comm) " - comm may contain spaces
    read -ra f <<<"$rest"      # f[0] is field 3 (state) => utime=f[11], stime=f[12]
    u=$(( u + f[11] )); st=$(( st + f[12] ))
  done
  echo "$u $st"
}

# Sum of VmRSS in kB over the given PIDs.
rss_kb() {
  local sum=0 p v
  for p in "$@"; do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
    sum=$(( sum + ${v:-0} ))
  done
  echo "$sum"
}

wait_ready() {  # wait_ready URL PID LOGFILE
  local url=$1 pid=$2 logf=$3 code i
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || { log "process $pid exited; log tail:"; tail -n 30 "$logf" >&2 || true; return 1; }
    code=$(curl -sk -o /dev/null -m 1 -w '%{http_code}' "$url" 2>/dev/null || true)
    [[ $code == 200 ]] && return 0
    sleep 0.1
  done
  log "timeout (10s) waiting for 200 from $url (last code: ${code:-none}); log tail:"
  tail -n 30 "$logf" >&2 || true
  return 1
}

# wrk latency value ("812.00us", "1.23ms", "1.02s", "2.00m") -> microseconds
to_us() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") m = 1; else if (u == "ms") m = 1000; else if (u == "s") m = 1e6;
    else if (u == "m") m = 6e7; else if (u == "h") m = 3.6e9; else m = -1
    if (m < 0) print "NaN"; else printf "%.0f\n", n * m }'
}

fmt_us() {  # microseconds -> "123µs" / "1.23ms"
  awk -v v="$1" 'BEGIN { if (v == "" || v == "NaN" || v == "-") { print "-"; exit }
    if (v < 1000) printf "%dµs\n", v; else if (v < 1e6) printf "%.2fms\n", v/1000; else printf "%.2fs\n", v/1e6 }'
}

# ------------------------------------------------------------------ configs
nginx_common() {  # nginx_common DIR WORKERS : directives keeping nginx inside DIR
  cat <<EOF
daemon off;
master_process on;
worker_processes $2;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
EOF
}
nginx_http_common() {
  cat <<EOF
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
EOF
}

write_upstream_conf() {
  local d=$TMP/upstream; mkdir -p "$d"
  {
    nginx_common "$d" "$UPSTREAM_WORKERS"
    echo "http {"
    nginx_http_common "$d"
    cat <<EOF
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
EOF
  } >"$d/nginx.conf"
}

write_nginx_proxy_conf() {
  local d=$TMP/nginx; mkdir -p "$d"
  {
    nginx_common "$d" "$WORKERS"
    echo "http {"
    nginx_http_common "$d"
    cat <<EOF
    upstream backend {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$PROXY_PORT$( [[ $TLS == 1 ]] && echo " ssl" );
$( [[ $TLS == 1 ]] && printf '        ssl_certificate %s;\n        ssl_certificate_key %s;\n' "$TMP/tls/cert.pem" "$TMP/tls/key.pem" )
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
  } >"$d/nginx.conf"
}

write_haproxy_conf() {
  local d=$TMP/haproxy; mkdir -p "$d"
  cat >"$d/haproxy.cfg" <<EOF
global
    nbthread $WORKERS
    maxconn 4096
    pidfile $d/haproxy.pid

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    timeout http-request 10s

frontend fe
    bind 127.0.0.1:$PROXY_PORT$( [[ $TLS == 1 ]] && echo " ssl crt $TMP/tls/combined.pem" )
    default_backend be

backend be
    server upstream 127.0.0.1:$UPSTREAM_PORT
EOF
}

write_bosun_conf() {
  local d=$TMP/bosun/config; mkdir -p "$d"
  bosun_bench_config "$PROXY_PORT" "$UPSTREAM_PORT" "$BOSUN_ROUTE" >"$d/bench.yaml"
}

# start_proxy NAME -> sets PROXY_PID
start_proxy() {  # logs go to $TMP/r$ROUND.NAME.log
  local name=$1 logf=$TMP/r$ROUND.$1.log
  case $name in
    nginx)
      write_nginx_proxy_conf
      taskset -c "$CPU_PROXY" nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" >"$logf" 2>&1 &
      ;;
    haproxy)
      write_haproxy_conf
      # -db: stay in foreground, no daemon / master-worker
      taskset -c "$CPU_PROXY" haproxy -db -f "$TMP/haproxy/haproxy.cfg" >"$logf" 2>&1 &
      ;;
    bosun)
      write_bosun_conf
      # shellcheck disable=SC2086
      taskset -c "$CPU_PROXY" "$BOSUN" proxy --mode gateway --config "$TMP/bosun/config" \
        --gateway-address 127.0.0.1 --admin-address "$ADMIN_ADDR" --workers "$WORKERS" \
        $BOSUN_EXTRA_ARGS >"$logf" 2>&1 &
      ;;
    *) die "unknown proxy: $name" ;;
  esac
  PROXY_PID=$!
  STARTED_PIDS+=("$PROXY_PID")
  wait_ready "$URL" "$PROXY_PID" "$logf"
}

# ------------------------------------------------------------------ versions
ver_nginx=$(nginx -v 2>&1 | sed 's/^nginx version: nginx\///')
ver_haproxy=$(haproxy -v 2>&1 | head -n1 | awk '{print $3}')
ver_wrk=$(wrk -v 2>&1 | head -n1 | awk '{print $2}' || true)
ver_h2load=$(h2load --version 2>&1 | head -n1 | awk '{print $2}')
ver_bosun=-
if [[ " $PROXIES " == *" bosun "* ]]; then
  ver_bosun=$(timeout 5 "$BOSUN" --version 2>/dev/null | head -n1 || true)
  ver_bosun=${ver_bosun:-$(basename "$BOSUN")}
fi

# ------------------------------------------------------------------ upstream
log "tmp dir: $TMP"
write_upstream_conf
taskset -c "$CPU_LOAD" nginx -p "$TMP/upstream" -c "$TMP/upstream/nginx.conf" >"$TMP/upstream.log" 2>&1 &
UPSTREAM_PID=$!
STARTED_PIDS+=("$UPSTREAM_PID")
wait_ready "http://127.0.0.1:$UPSTREAM_PORT/" "$UPSTREAM_PID" "$TMP/upstream.log" || die "upstream nginx failed to start"
log "upstream nginx ready (pid $UPSTREAM_PID, cpu $CPU_LOAD)"

# ------------------------------------------------------------------ runs
# Per-round results, keyed "proxy:round". Latencies in µs, CPU in µs/req, RSS in kB.
declare -A R_RPS R_P50 R_P99 R_LP50 R_LP99 R_CPU R_UCPU R_SCPU R_RSS R_NOTE R_LRATE R_LCPU
RAW_TSV=$TMP/rounds.tsv
printf 'round\tproxy\trps\tp50_us\tp99_us\tlat_p50_us\tlat_p99_us\tcpu_us_req\tuser_us_req\tsys_us_req\trss_kb\tlat_rate\tlat_cpu_us_req\n' >"$RAW_TSV"

per_req() {  # per_req TICKS REQS -> µs per request
  awk -v d="$1" -v hz="$CLK_TCK" -v n="$2" \
    'BEGIN { if (n > 0) printf "%.2f", d / hz * 1e6 / n; else print "NaN" }'
}

note() {  # note KEY TEXT
  R_NOTE[$1]+="${R_NOTE[$1]:+; }$2"
}

# Stop the proxy under test and wait for its port to be free again.
finish_one() {
  local i
  stop_pid "$PROXY_PID"
  for ((i = 0; i < 50; i++)); do port_busy "$PROXY_PORT" || break; sleep 0.1; done
}

run_one() {  # run_one NAME (uses $ROUND)
  local name=$1 k="$1:$ROUND" tag="r$ROUND.$1" pids wrk_out reqs rps p50 p99 errs
  local u0 s0 u1 s1
  log "== round $ROUND/$ROUNDS, $name: starting on cpu $CPU_PROXY"
  if ! start_proxy "$name"; then
    log "$name failed to start; skipping it this round"
    note "$k" "failed to start (log tail printed on stderr)"
    finish_one
    return 0
  fi
  mapfile -t pids < <(tree_pids "$PROXY_PID")
  log "$name ready; pids: ${pids[*]}"

  log "$name: warm-up ${WARMUP}s"
  taskset -c "$CPU_LOAD" wrk -t"$LOAD_THREADS" -c"$CONNS" -d"${WARMUP}s" "${WRK_BODY[@]}" "$URL" >/dev/null 2>&1 || true

  log "$name: wrk -t$LOAD_THREADS -c$CONNS -d${DURATION}s --latency"
  mapfile -t pids < <(tree_pids "$PROXY_PID")
  read -r u0 s0 < <(cpu_ticks "${pids[@]}")
  wrk_out=$(taskset -c "$CPU_LOAD" wrk -t"$LOAD_THREADS" -c"$CONNS" -d"${DURATION}s" --latency "${WRK_BODY[@]}" "$URL" 2>&1) || {
    log "wrk failed:"; echo "$wrk_out" >&2; note "$k" "wrk failed"; finish_one; return 0; }
  read -r u1 s1 < <(cpu_ticks "${pids[@]}")
  R_RSS[$k]=$(rss_kb "${pids[@]}")
  echo "$wrk_out" >"$TMP/$tag.wrk.txt"

  reqs=$(awk '/ requests in / {print $1; exit}' <<<"$wrk_out")
  rps=$(awk '/^Requests\/sec:/ {print $2; exit}' <<<"$wrk_out")
  p50=$(awk '$1 == "50%" {print $2; exit}' <<<"$wrk_out")
  p99=$(awk '$1 == "99%" {print $2; exit}' <<<"$wrk_out")
  [[ -n $reqs && -n $rps && -n $p50 && -n $p99 ]] || {
    log "could not parse wrk output:"; echo "$wrk_out" >&2; die "wrk parse error"; }
  R_RPS[$k]=$rps
  R_P50[$k]=$(to_us "$p50")
  R_P99[$k]=$(to_us "$p99")
  R_CPU[$k]=$(per_req $((u1 - u0 + s1 - s0)) "$reqs")
  R_UCPU[$k]=$(per_req $((u1 - u0)) "$reqs")
  R_SCPU[$k]=$(per_req $((s1 - s0)) "$reqs")
  errs=$(awk '/Non-2xx or 3xx responses:/ {n += $NF} /Socket errors:/ {
      for (i = 3; i <= NF; i += 2) { v = $(i+1); gsub(/,/, "", v); n += v } } END { print n + 0 }' <<<"$wrk_out")
  (( errs == 0 )) || note "$k" "wrk: $errs errors/non-2xx"
  log "$name: $rps rps, p50 $p50 p99 $p99, $reqs reqs, cpu $((u1 - u0))+$((s1 - s0)) ticks user+sys (${R_CPU[$k]} µs/req), rss ${R_RSS[$k]} kB"

  sleep 1
  log "$name: h2load --h1 -c $LAT_CONNS --rps $LAT_RPS_PER_CONN -D $LAT_DURATION (= $LAT_RPS rps)"
  local hlog=$TMP/$tag.h2load.tsv h_out lu0 ls0 lu1 ls1 lreqs lbad
  read -r lu0 ls0 < <(cpu_ticks "${pids[@]}")
  h_out=$(taskset -c "$CPU_LOAD" h2load --h1 -t "$LOAD_THREADS" -c "$LAT_CONNS" --rps "$LAT_RPS_PER_CONN" \
            -D "$LAT_DURATION" --log-file="$hlog" "${H2_BODY[@]}" "$URL" 2>&1) || {
    log "h2load failed:"; echo "$h_out" >&2; note "$k" "h2load failed"; finish_one; return 0; }
  read -r lu1 ls1 < <(cpu_ticks "${pids[@]}")
  echo "$h_out" >"$TMP/$tag.h2load.txt"
  # log-file columns: start (µs since epoch), status, duration (µs)
  lbad=$(awk -F'\t' '!($2 >= 200 && $2 < 400) { n++ } END { print n + 0 }' "$hlog")
  # every round's good durations, pooled per proxy for the all-rounds p99
  awk -F'\t' '$2 >= 200 && $2 < 400 { print $3 }' "$hlog" >>"$TMP/$name.lat.pooled"
  read -r lreqs R_LP50[$k] R_LP99[$k] < <(
    awk -F'\t' '$2 >= 200 && $2 < 400 { print $3 }' "$hlog" | sort -n | awk '
      { v[NR] = $1 }
      END {
        if (NR == 0) { print 0, "NaN", "NaN"; exit }
        i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++   # nearest-rank
        i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
        print NR, v[i50], v[i99] }')
  (( lbad == 0 )) || note "$k" "h2load: $lbad failed/non-2xx"
  R_LRATE[$k]=$(awk '/^finished in/ {gsub(/,/, "", $4); print $4; exit}' <<<"$h_out")
  R_LCPU[$k]=$(per_req $((lu1 - lu0 + ls1 - ls0)) "$lreqs")
  log "$name: $lreqs reqs at ${R_LRATE[$k]:-?} req/s, p50 ${R_LP50[$k]}us p99 ${R_LP99[$k]}us"

  finish_one
  log "== round $ROUND/$ROUNDS, $name: done"
}

NPROXY=${#PROXY_LIST[@]}
ROUND_ORDERS=()
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  order=()
  for ((i = 0; i < NPROXY; i++)); do
    order+=("${PROXY_LIST[(i + ROUND - 1) % NPROXY]}")
  done
  ROUND_ORDERS+=("${order[*]}")
  log "=== round $ROUND/$ROUNDS: ${order[*]}"
  for p in "${order[@]}"; do
    run_one "$p"
    k="$p:$ROUND"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ROUND" "$p" \
      "${R_RPS[$k]:--}" "${R_P50[$k]:--}" "${R_P99[$k]:--}" "${R_LP50[$k]:--}" "${R_LP99[$k]:--}" \
      "${R_CPU[$k]:--}" "${R_UCPU[$k]:--}" "${R_SCPU[$k]:--}" "${R_RSS[$k]:--}" \
      "${R_LRATE[$k]:--}" "${R_LCPU[$k]:--}" >>"$RAW_TSV"
  done
done
LOADAVG_END=$(cut -d' ' -f1 /proc/loadavg)

# ------------------------------------------------------------------ aggregation
# vals ARRAYNAME PROXY -> the proxy's per-round values of that array, one a
# line, missing/NaN rounds left out.
vals() {
  local -n arr=$1
  local r v
  for ((r = 1; r <= ROUNDS; r++)); do
    v=${arr[$2:$r]:-}
    [[ -n $v && $v != NaN ]] && echo "$v"
  done
  return 0
}
median() {  # median ARRAYNAME PROXY -> median over rounds ("" if none)
  vals "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) exit
    if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
range() {  # range ARRAYNAME PROXY -> "MIN MAX" ("" if none)
  vals "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { if (NR) print lo, hi }'
}

declare -A M_RPS M_P50 M_P99 M_LP50 M_LP99 M_CPU M_UCPU M_SCPU M_RSS M_LRATE M_LCPU M_N
declare -A POOLED_P99 POOLED_N
for p in "${PROXY_LIST[@]}"; do
  # p99 over every round's requests together (nearest rank): one slow round
  # moves it less than it moves the median of per-round p99s, and it rests
  # on ROUNDS times as many requests.
  read -r POOLED_N[$p] POOLED_P99[$p] < <(sort -n "$TMP/$p.lat.pooled" 2>/dev/null | awk '
    { v[NR] = $1 }
    END { if (NR == 0) { print 0, ""; exit }
          i = int(NR * 0.99); if (i < NR * 0.99) i++; print NR, v[i] }')
  M_N[$p]=$(vals R_RPS "$p" | wc -l)
  for f in RPS P50 P99 LP50 LP99 CPU UCPU SCPU RSS LRATE LCPU; do
    declare -n dst=M_$f
    dst[$p]=$(median "R_$f" "$p")
    unset -n dst
  done
done

# ------------------------------------------------------------------ report
ratio() {  # ratio A B -> "A/B" formatted, or "-"
  awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a == "NaN" || b == "NaN" || b + 0 == 0) print "-"; else printf "%.2f×\n", a / b }'
}
mb() { awk -v k="$1" 'BEGIN { if (k == "") print "-"; else printf "%.1f\n", k / 1024 }'; }
f2() { awk -v v="$1" 'BEGIN { if (v == "") print "-"; else printf "%.2f\n", v }'; }
f1() { awk -v v="$1" 'BEGIN { if (v == "") print "-"; else printf "%.1f\n", v }'; }

report() {
  local p r lo hi order
  echo "# Bosun proxy benchmark — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Host: $(uname -srm), $NCPU CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || echo '?'))."
  echo "Machine: $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo))."
  echo "Upstream nginx ($UPSTREAM_WORKERS workers) + load generator ($LOAD_THREADS threads) on CPUs $CPU_LOAD; proxy on CPUs $CPU_PROXY with $WORKERS workers each."
  echo "Requests: $REQUESTS."
  if [[ $TLS == 1 ]]; then echo "TLS termination at the proxy (self-signed P-256 certificate, each proxy's default TLS settings); plaintext upstream."; else echo "Plaintext."; fi
  echo "Saturation: \`wrk -t$LOAD_THREADS -c$CONNS -d${DURATION}s --latency\` after ${WARMUP}s warm-up."
  echo "Latency: \`h2load --h1 -t1 -c$LAT_CONNS --rps $LAT_RPS_PER_CONN -D $LAT_DURATION\` (= $LAT_RPS rps), p50/p99 from \`--log-file\`."
  order=""
  for ((r = 1; r <= ROUNDS; r++)); do
    order+="${order:+; }${ROUND_ORDERS[r - 1]// /, }"
  done
  echo "Rounds: $ROUNDS, a fresh proxy process each time, order rotated per round ($order)."
  echo "Every figure below is the median over the rounds; ratios are ratios of medians."
  echo "Load average before the run: $LOADAVG (after: $LOADAVG_END, includes the benchmark itself)."
  echo "Versions: nginx $ver_nginx, haproxy $ver_haproxy, bosun $ver_bosun, wrk $ver_wrk, h2load $ver_h2load."
  echo
  echo "| proxy | rps (wrk) | p50/p99 at saturation | p50/p99 at $LAT_RPS rps | CPU µs/req | RSS MB |"
  echo "|---|---:|---:|---:|---:|---:|"
  for p in "${PROXY_LIST[@]}"; do
    if [[ -z ${M_RPS[$p]} ]]; then
      echo "| $p | - | - | - | - | - |"
      continue
    fi
    printf '| %s | %.0f | %s / %s | %s / %s | %s | %s |\n' "$p" "${M_RPS[$p]}" \
      "$(fmt_us "${M_P50[$p]}")" "$(fmt_us "${M_P99[$p]}")" \
      "$(fmt_us "${M_LP50[$p]}")" "$(fmt_us "${M_LP99[$p]}")" \
      "$(f2 "${M_CPU[$p]}")" "$(mb "${M_RSS[$p]}")"
  done
  echo
  if [[ -n ${M_RPS[bosun]:-} ]]; then
    echo "| ratio (of medians) | CPU µs/req | p99 at $LAT_RPS rps | p99 at $LAT_RPS rps, rounds pooled | RSS |"
    echo "|---|---:|---:|---:|---:|"
    for p in nginx haproxy; do
      [[ -n ${M_RPS[$p]:-} ]] || continue
      echo "| bosun / $p | $(ratio "${M_CPU[bosun]}" "${M_CPU[$p]}") | $(ratio "${M_LP99[bosun]}" "${M_LP99[$p]}") | $(ratio "${POOLED_P99[bosun]}" "${POOLED_P99[$p]}") | $(ratio "${M_RSS[bosun]}" "${M_RSS[$p]}") |"
    done
    echo
  else
    echo "_no bosun result: no ratios._"
    echo
  fi
  echo "Details (medians over rounds unless a range is given):"
  echo
  for p in "${PROXY_LIST[@]}"; do
    if [[ -z ${M_RPS[$p]} ]]; then
      echo "- $p: no result in any round"
    else
      echo "- $p (${M_N[$p]}/$ROUNDS rounds):"
      lo= hi=
      read -r lo hi < <(range R_CPU "$p") || true
      echo "  - CPU µs/req at saturation: $(f2 "${M_CPU[$p]}"), range $(f2 "$lo")–$(f2 "$hi")"
      echo "  - $p: $(f1 "${M_UCPU[$p]}") µs user + $(f1 "${M_SCPU[$p]}") µs sys per request (at saturation)"
      lo= hi=
      read -r lo hi < <(range R_LP99 "$p") || true
      echo "  - p99 at $LAT_RPS rps: $(fmt_us "${M_LP99[$p]}"), range $(fmt_us "$lo")–$(fmt_us "$hi"); all rounds pooled: $(fmt_us "${POOLED_P99[$p]}") over ${POOLED_N[$p]} requests"
      echo "  - latency run achieved $(f2 "${M_LRATE[$p]}") req/s; proxy CPU at $LAT_RPS rps $(f2 "${M_LCPU[$p]}") µs/req"
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
      [[ -n ${R_NOTE[$p:$r]:-} ]] && echo "  - round $r: ${R_NOTE[$p:$r]}"
    done
  done
  return 0
}

report | tee "$OUT_MD"
log "written: $OUT_MD"
