#!/usr/bin/env bash
# Per-request costs that CPU time on a shared VM cannot separate, counted by
# callgrind for Bosun and nginx as the same reverse proxy (1 worker, upstream
# nginx, keep-alive HTTP/1.1 from h2load --h1 -c 8): instructions, simulated
# L1 instruction- and data-cache misses (callgrind's model of this CPU's
# caches), conditional-branch mispredictions, the hot code's size (distinct
# 64-byte lines of instructions run at least once a request) and atomic
# read-modify-write instructions (lock-prefixed or xchg: ~20 cycles each).
# Start-up is subtracted: one run of 1,000 requests, one of 1,000 + N.
#
#   bench/cachesim.sh [N]
#   BOSUN [target/release/bosun]; PROXIES ["nginx bosun"]
# Needs valgrind, nginx, h2load, objdump and python3.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/bosun-config.sh
. "$ROOT/bench/bosun-config.sh"
N=${1:-20000}
BOSUN=$(realpath "${BOSUN:-$ROOT/target/release/bosun}")
PROXIES=${PROXIES:-nginx bosun}
UP_PORT=18680 PX_PORT=18682 ADMIN=127.0.0.1:18683
T=$(mktemp -d)
chmod 755 "$T"
# A proxy left running by a failed step is stopped too (it would hold the port).
trap 'kill $(jobs -p) "$(cat "$T/up.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$T"' EXIT

nginx_conf() {  # nginx_conf NAME SERVER_BLOCK
  cat <<EOF
daemon off; master_process off; worker_processes 1;
pid $T/$1.pid; error_log $T/$1.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $T/cb; proxy_temp_path $T/pt; fastcgi_temp_path $T/ft;
  uwsgi_temp_path $T/ut; scgi_temp_path $T/st;
  $2 }
EOF
}
nginx_conf up "server { listen 127.0.0.1:$UP_PORT;
  location / { default_type text/plain; return 200 \"ok\n\"; } }" >"$T/up.conf"
nginx_conf px "upstream backend { server 127.0.0.1:$UP_PORT; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$PX_PORT; location / { proxy_pass http://backend;
    proxy_http_version 1.1; proxy_set_header Connection \"\"; } }" >"$T/px.conf"
mkdir -p "$T/c"
bosun_bench_config "$PX_PORT" "$UP_PORT" >"$T/c/bench.yaml"
nginx -p "$T" -c "$T/up.conf" 2>/dev/null &

run() {  # run PROXY REQUESTS OUT
  local vg=(valgrind --tool=callgrind --cache-sim=yes --branch-sim=yes --dump-instr=yes
    --callgrind-out-file="$3")
  case $1 in
    bosun) "${vg[@]}" "$BOSUN" proxy --mode gateway --config "$T/c" --gateway-address 127.0.0.1 \
      --admin-address "$ADMIN" --workers 1 >/dev/null 2>"$T/vg.err" & ;;
    nginx) "${vg[@]}" nginx -p "$T" -c "$T/px.conf" >/dev/null 2>"$T/vg.err" & ;;
  esac
  local vp=$!
  bench_wait_http "http://127.0.0.1:$PX_PORT/" || true
  h2load --h1 -n "$2" -c 8 "http://127.0.0.1:$PX_PORT/" >"$T/h2load" 2>&1
  grep -q "$2 succeeded" "$T/h2load" || { cat "$T/h2load" "$T/vg.err" >&2; exit 1; }
  kill -INT "$vp"; sleep 1
  kill -QUIT "$vp" 2>/dev/null || true
  wait "$vp" 2>/dev/null || true
}

echo "| proxy | instructions | I1 misses | D1 misses | branch mispredicts | hot code (KiB) | atomic RMW |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for p in $PROXIES; do
  run "$p" 1000 "$T/$p.base"
  run "$p" $((N + 1000)) "$T/$p.full"
  bin=$BOSUN
  [[ $p == nginx ]] && bin=$(command -v nginx || echo /usr/sbin/nginx)
  python3 - "$T/$p.base" "$T/$p.full" "$N" "$p" "$bin" <<'EOF'
import collections, re, subprocess, sys
base, full, n, name, binary = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]

def summary(f):
    ev = summ = None
    for line in open(f):
        if line.startswith('events:'):
            ev = line.split()[1:]
        elif line.startswith('summary:'):
            summ = list(map(int, line.split()[1:]))
    return dict(zip(ev, summ))

def per_instruction(f):
    """Self cost (Ir) per instruction address, with the object it is in."""
    cnt = collections.Counter()
    objs, obj, addr, after_call = {}, None, 0, False
    for line in open(f):
        if not line.strip() or line[0] == '#':
            continue
        if line.startswith('calls='):
            after_call = True
            continue
        if line.startswith(('ob=', 'cob=')):
            m = re.match(r'c?ob=\((\d+)\)(?: (.*))?', line.strip())
            if m.group(2):
                objs[m.group(1)] = m.group(2)
            if line[0] == 'o':
                obj = m.group(1)
            continue
        if line[0].isalpha():
            continue
        t = line.split()
        if t[0].startswith('0x'):
            addr = int(t[0], 16)
        elif t[0][0] in '+-':
            addr += int(t[0])
        elif t[0] != '*':
            continue
        if after_call:  # a call's inclusive cost, not this instruction's
            after_call = False
            continue
        cnt[(objs.get(obj, '?'), addr)] += int(t[2]) if len(t) > 2 else 0
    return cnt

a, b = summary(base), summary(full)
d = {k: (b[k] - a[k]) / n for k in a}
# Run at least once a request: in the full run, not (or less) in the base run.
hot_b, hot_a = per_instruction(full), per_instruction(base)
hot = {k: (v - hot_a.get(k, 0)) / n for k, v in hot_b.items()}
hot = {k: v for k, v in hot.items() if v >= 0.99}
lines = {(o, x >> 6) for (o, x) in hot}
dis = subprocess.run(['objdump', '-d', '--no-show-raw-insn', binary],
                     capture_output=True, text=True).stdout
mine = {x: v for (o, x), v in hot.items() if o == binary}
atomics = 0.0
for line in dis.splitlines():
    m = re.match(r'\s*([0-9a-f]+):\s+(\S+)(.*)', line)
    if m and (m.group(2) == 'lock' or (m.group(2).startswith('xchg') and '(' in m.group(3))):
        atomics += mine.get(int(m.group(1), 16), 0.0)
print(f"| {name} | {d['Ir']:,.0f} | {d['I1mr']:,.0f} | {d['D1mr'] + d['D1mw']:,.0f} | "
      f"{d['Bcm'] + d['Bim']:,.0f} | {len(lines) * 64 / 1024:,.0f} | {atomics:,.0f} |")
EOF
done
