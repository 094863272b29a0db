# Sourced by the bench scripts: the config every Bosun benchmark runs, a
# gateway on one port proxying to one upstream (the same reverse proxy
# nginx and haproxy are set up as).
#
#   bosun_bench_config PROXY_PORT UPSTREAM_PORT [ROUTE_LINES] > DIR/bench.yaml
#   ROUTE_LINES: YAML added to the route (4-space indent), e.g. "    timeout: 10s"
#   BENCH_TLS_CERT / BENCH_TLS_KEY set: the server terminates TLS with them.
#   BENCH_TCP=1: the same bytes forwarded as opaque TCP (bench/floor.sh).
bosun_bench_config() {
  local proto=HTTP name=http route="http:
  - route: [{destination: {host: upstream.bench}}]"
  if [[ ${BENCH_TCP:-0} == 1 ]]; then
    proto=TCP name=tcp route="tcp:
  - route: [{destination: {host: upstream.bench, port: {number: 80}}}]"
  fi
  local server="  - port: {number: $1, name: $name, protocol: $proto}"
  if [[ -n ${BENCH_TLS_CERT:-} ]]; then
    server="  - port: {number: $1, name: https, protocol: HTTPS}
    tls: {mode: SIMPLE, serverCertificate: $BENCH_TLS_CERT, privateKey: $BENCH_TLS_KEY}"
  fi
  cat <<YAML
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bench, namespace: bench}
spec:
  selector: {istio: ingressgateway}
  servers:
$server
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: upstream, namespace: bench}
spec:
  hosts: [upstream.bench]
  resolution: STATIC
  ports: [{number: 80, name: $name, protocol: $proto}]
  endpoints: [{address: 127.0.0.1, ports: {$name: $2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: upstream, namespace: bench}
spec:
  hosts: ["*"]
  gateways: [bench]
  $route
${3:-}
YAML
}

# bench_wait_http URL: waits until URL answers (about 30 s at most).
bench_wait_http() {
  local _
  for _ in $(seq 1 100); do
    curl -sk -o /dev/null "$1" && return 0
    sleep 0.3
  done
  return 1
}
