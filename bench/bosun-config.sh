# Sourced by the bench scripts: the config every Bosun benchmark runs, a
# gateway on one port proxying to one upstream (the same reverse proxy
# nginx and haproxy are set up as).
#
#   bosun_bench_config PROXY_PORT UPSTREAM_PORT [ROUTE_LINES] > DIR/bench.yaml
#   ROUTE_LINES: YAML added to the route (4-space indent), e.g. "    timeout: 10s"
bosun_bench_config() {
  cat <<YAML
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bench, namespace: bench}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: $1, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: upstream, namespace: bench}
spec:
  hosts: [upstream.bench]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: $2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: upstream, namespace: bench}
spec:
  hosts: ["*"]
  gateways: [bench]
  http:
  - route: [{destination: {host: upstream.bench}}]
${3:-}
YAML
}
