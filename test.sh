#!/usr/bin/env bash
# Runs every check and test Bosun has. Installs the outside clients the tests
# use when they are missing: curl, h2load (nghttp2-client), wrk, etcd (etcd-server),
# nftables, iptables and iproute2 (node mode, in network namespaces), openssl (certificates
# from another PKI for the mTLS tests), and Python's
# grpcio + xds-protos for the xDS conformance test.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
command -v curl >/dev/null || missing+=(curl)
command -v h2load >/dev/null || missing+=(nghttp2-client)
# The drain test puts wrk's load on the proxy while it drains.
command -v wrk >/dev/null || missing+=(wrk)
command -v etcd >/dev/null || missing+=(etcd-server)
# Node mode's tests program real rules in network namespaces (as root).
command -v nft >/dev/null || missing+=(nftables)
command -v iptables-restore >/dev/null || missing+=(iptables)
command -v ip >/dev/null || missing+=(iproute2)
# mTLS tests make certificates with a PKI that is not Bosun's.
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A stock xDS client for the conformance test: Envoy's generated protos.
if ! python3 -c "import grpc, envoy.service.discovery.v3.ads_pb2_grpc" 2>/dev/null; then
    echo "test.sh: installing grpcio and xds-protos (PyPI)"
    python3 -m pip install --quiet grpcio xds-protos
fi

# deploy/ and what `bosun inject` makes, against Kubernetes' schemas
# (kubernetes-validate from PyPI, offline once installed).
deploy/validate.sh deploy/crds.yaml deploy/bosun.yaml \
    control/tests/golden/bookinfo-injected.yaml control/tests/golden/workloads-injected.yaml

# A clean clone builds once: incremental caches would only take disk (2 GB).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
