#!/usr/bin/env bash
# bench/floor.sh [ROUNDS]: the floor under an HTTP proxy's CPU per request
# on this machine. The same keep-alive load (wrk -t1 -c64, upstream nginx,
# both on CPU 0) goes through, one at a time on CPU 1 with one worker:
#   nginx        the HTTP reverse proxy bench/run.sh compares against;
#   bosun-http   Bosun's gateway, as in bench/run.sh;
#   bosun-tcp    Bosun forwarding the same bytes as opaque TCP;
#   haproxy-tcp  haproxy in `mode tcp`.
# A TCP forwarder makes the same four socket calls a request as an HTTP
# proxy (read the client, write the upstream, read the upstream, write the
# client) and no HTTP work: what it costs is the kernel's share, which no
# user-space proxy on these sockets goes under. Prints CPU µs per request
# (user + sys from /proc over 6 s) per proxy and round.
#   BOSUN [target/pgo/release/bosun if built, else target/release/bosun]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/bosun-config.sh
. "$ROOT/bench/bosun-config.sh"
R=${1:-3}; BOSUN=${BOSUN:-$ROOT/target/pgo/release/bosun}
[[ -x $BOSUN ]] || BOSUN=$ROOT/target/release/bosun
T=$(mktemp -d); chmod 755 $T
UP=18780 PX=18782
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 0.3; rm -rf $T' EXIT
common() { echo "daemon off; master_process off; worker_processes 1; pid $T/$1.pid; error_log $T/$1.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $T/cb; proxy_temp_path $T/pt; fastcgi_temp_path $T/ft; uwsgi_temp_path $T/ut; scgi_temp_path $T/st;"; }
{ common up; echo " server { listen 127.0.0.1:$UP; location / { default_type text/plain; return 200 \"ok\n\"; } } }"; } > $T/up.conf
{ common px; echo " upstream backend { server 127.0.0.1:$UP; keepalive 64; keepalive_requests 1000000; }
 server { listen 127.0.0.1:$PX; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } } }"; } > $T/px.conf
cat > $T/hap.cfg <<C
global
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen px
  bind 127.0.0.1:$PX
  server up 127.0.0.1:$UP
C
mkdir -p $T/h $T/t; bosun_bench_config $PX $UP > $T/h/bench.yaml
BENCH_TCP=1 bosun_bench_config $PX $UP > $T/t/bench.yaml
taskset -c 0 nginx -p $T -c $T/up.conf &
for r in $(seq 1 $R); do
  for p in nginx bosun-http bosun-tcp haproxy-tcp; do
    case $p in
      nginx) taskset -c 1 nginx -p $T -c $T/px.conf & ;;
      bosun-http) taskset -c 1 $BOSUN proxy --mode gateway --config $T/h --gateway-address 127.0.0.1 --admin-address 127.0.0.1:18783 --workers 1 >/dev/null 2>&1 & ;;
      bosun-tcp) taskset -c 1 $BOSUN proxy --mode gateway --config $T/t --gateway-address 127.0.0.1 --admin-address 127.0.0.1:18783 --workers 1 >$T/bt.log 2>&1 & ;;
      haproxy-tcp) taskset -c 1 haproxy -f $T/hap.cfg >/dev/null 2>&1 & ;;
    esac
    pid=$!
    bench_wait_http http://127.0.0.1:$PX/ >/dev/null || { echo "$p not ready"; cat $T/bt.log 2>/dev/null | tail -5; kill $pid; wait $pid 2>/dev/null; continue; }
    taskset -c 0 wrk -t1 -c64 -d2s http://127.0.0.1:$PX/ >/dev/null
    read -r u0 s0 < <(awk '{print $14, $15}' /proc/$pid/stat)
    out=$(taskset -c 0 wrk -t1 -c64 -d6s http://127.0.0.1:$PX/)
    read -r u1 s1 < <(awk '{print $14, $15}' /proc/$pid/stat)
    n=$(echo "$out" | awk '/requests in/{print $1}')
    printf "%-12s round %d: %.2f us/req (user %.2f sys %.2f)\n" $p $r $(echo "($u1-$u0+$s1-$s0)*10000/$n" | bc -l) $(echo "($u1-$u0)*10000/$n" | bc -l) $(echo "($s1-$s0)*10000/$n" | bc -l)
    kill -KILL $pid; wait $pid 2>/dev/null || true; sleep 0.5
  done
done
