#!/usr/bin/env python3
"""A stock xDS client against `bosun control`: Envoy's own generated protos
(the `xds-protos` package from PyPI) and grpcio, nothing from Bosun.

Usage: xds_client.py XDS_ADDR CONTROL_ADMIN_ADDR
Exits non-zero with a message on the first check that fails.
"""
import json
import queue
import sys
import time
import urllib.request

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

CLUSTER = "type.googleapis.com/bosun.config.v1.Cluster"
LISTENER = "type.googleapis.com/bosun.config.v1.Listener"
CLA = "type.googleapis.com/bosun.config.v1.ClusterLoadAssignment"


def check(cond, what):
    if not cond:
        print("FAIL:", what, file=sys.stderr)
        sys.exit(1)


def node(node_id):
    md = struct_pb2.Struct()
    md.update({"MODE": "gateway", "GATEWAY_ADDRESS": "127.0.0.1"})
    return base_pb2.Node(id=node_id, user_agent_name="python-conformance", metadata=md)


class Stream:
    """A bidirectional stream fed from a queue."""

    def __init__(self, method):
        self.q = queue.Queue()
        self.responses = method(iter(self.q.get, None), timeout=30)

    def send(self, msg):
        self.q.put(msg)

    def recv(self):
        return next(self.responses)

    def close(self):
        self.q.put(None)


def proxies(admin):
    with urllib.request.urlopen(f"http://{admin}/debug/proxies", timeout=5) as r:
        return json.load(r)


def main():
    xds, admin = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(xds)
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)

    # State of the world: wildcard subscription, ACK, NACK.
    s = Stream(stub.StreamAggregatedResources)
    s.send(discovery_pb2.DiscoveryRequest(node=node("py-sotw"), type_url=CLUSTER))
    r = s.recv()
    check(r.type_url == CLUSTER, f"type_url {r.type_url}")
    check(r.version_info and r.nonce, "version_info and nonce are set")
    check(len(r.resources) > 0, "a wildcard subscription returns every cluster")
    check(all(a.type_url == CLUSTER for a in r.resources), "resources are Any of the requested type")
    version = r.version_info
    s.send(discovery_pb2.DiscoveryRequest(version_info=version, type_url=CLUSTER, response_nonce=r.nonce))
    s.send(discovery_pb2.DiscoveryRequest(type_url=LISTENER))
    r2 = s.recv()
    check(r2.type_url == LISTENER and r2.version_info == version, "listeners at the same version")
    check(r2.nonce != r.nonce, "each response has its own nonce")
    s.send(discovery_pb2.DiscoveryRequest(
        version_info="", type_url=LISTENER, response_nonce=r2.nonce,
        error_detail=status_pb2.Status(code=3, message="python says no")))
    deadline = time.time() + 5
    while True:
        ps = [p for p in proxies(admin) if p["node_id"] == "py-sotw"]
        if ps and ps[0].get("last_nack") and "python says no" in ps[0]["last_nack"]:
            break
        check(time.time() < deadline, f"the NACK shows in status: {ps}")
        time.sleep(0.05)
    check(ps[0]["acked_version"] == version, "the ACKed version is kept after a NACK")

    # Incremental: names and versions per resource, ACK, resume with known versions.
    d = Stream(stub.DeltaAggregatedResources)
    d.send(discovery_pb2.DeltaDiscoveryRequest(node=node("py-delta"), type_url=CLA))
    dr = d.recv()
    check(dr.type_url == CLA and dr.nonce, "delta response type and nonce")
    check(dr.system_version_info == version, "delta and SotW agree on the version")
    check(len(dr.resources) > 0 and all(x.name and x.version for x in dr.resources),
          "every delta resource has a name and a version")
    known = {x.name: x.version for x in dr.resources}
    d.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLA, response_nonce=dr.nonce))
    d.close()

    d2 = Stream(stub.DeltaAggregatedResources)
    d2.send(discovery_pb2.DeltaDiscoveryRequest(
        node=node("py-delta-2"), type_url=CLA, initial_resource_versions=known))
    dr2 = d2.recv()
    check(len(dr2.resources) == 0 and len(dr2.removed_resources) == 0,
          "a client that already has every version gets nothing again")
    d2.close()
    s.close()
    print("xDS conformance: ok (SotW wildcard, ACK, NACK, delta, resume)")


if __name__ == "__main__":
    main()
