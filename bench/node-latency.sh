#!/usr/bin/env bash
# First-packet latency through node mode's rules at few and many services:
# a client, a node and one backend namespace (no route out); the node is
# programmed with S services (every endpoint is the one backend) by
# `node-sync --program` (which first removes the other backend's rules), and the client times TCP connects to a cluster IP
# (the last service programmed: the worst case for iptables' linear scan).
# Usage (root): [BACKENDS="nftables iptables"] bench/node-latency.sh [SERVICES...]   default: 10 10000
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then SIZES=("$@"); else SIZES=(10 10000); fi
CONNECTS=${CONNECTS:-2000}
[ -x target/release/node-sync ] || cargo build --release -p bosun-node-sync -p bosun
[ -x target/release/bosun ] || cargo build --release -p bosun
P=bsnlat$$
cleanup() { for n in $P-node $P-cl $P-b1; do ip netns del $n 2>/dev/null || true; done; kill $ECHO 2>/dev/null || true; }
trap cleanup EXIT
for n in $P-node $P-cl $P-b1; do ip netns add $n; ip -n $n link set lo up; done
ip -n $P-cl link add eth0 type veth peer name c0 netns $P-node
ip -n $P-cl addr add 10.0.0.2/24 dev eth0; ip -n $P-cl link set eth0 up; ip -n $P-cl route add default via 10.0.0.1
ip -n $P-node addr add 10.0.0.1/24 dev c0; ip -n $P-node link set c0 up
ip -n $P-b1 link add eth0 type veth peer name b1 netns $P-node
ip -n $P-b1 addr add 10.1.1.2/24 dev eth0; ip -n $P-b1 link set eth0 up; ip -n $P-b1 route add default via 10.1.1.1
ip -n $P-node addr add 10.1.1.1/24 dev b1; ip -n $P-node link set b1 up
ip netns exec $P-node sysctl -qw net.ipv4.ip_forward=1
ip netns exec $P-b1 target/release/bosun echo --listen 0.0.0.0:8080 --name b1 >/dev/null 2>&1 &
ECHO=$!
sleep 0.5
echo "| services | backend | connect p50 | connect p99 |"
echo "|---:|---|---:|---:|"
for n in "${SIZES[@]}"; do
  for backend in ${BACKENDS:-nftables iptables}; do
    NODE_SYNC_ENDPOINT=10.1.1.2:8080 ip netns exec $P-node target/release/node-sync --program "$n" "$backend"
    last=$((n - 1)); ip="10.96.$((last / 250)).$((last % 250 + 1))"
    ip netns exec $P-cl python3 - "$ip" "$CONNECTS" "$n" "$backend" <<'PY'
import socket, sys, time
ip, n, services, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ts = []
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    t = time.perf_counter()
    s.connect((ip, 80))
    ts.append(time.perf_counter() - t)
    s.close()
ts.sort()
print(f"| {services} | {backend} | {ts[len(ts)//2]*1e6:.0f} µs | {ts[int(len(ts)*0.99)]*1e6:.0f} µs |")
PY
  done
done
