//! The control service and proxies over ADS, as real processes.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bosun_xds_proto::core::Node;
use bosun_xds_proto::discovery::DeltaDiscoveryRequest;
use bosun_xds_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use bosun_xds_proto::prost_types::{Struct, Value, value::Kind};
use bosun_xds_proto::type_url;

use crate::harness::*;

fn mesh(port: u16, be: SocketAddr, extra_server_port: Option<u16>) -> String {
    let mut y = gateway("x", port);
    if let Some(p) = extra_server_port {
        y = y.replace(
            "    hosts: [\"*\"]\n---\n",
            &format!("    hosts: [\"*\"]\n  - port: {{number: {p}, name: http-2, protocol: HTTP}}\n    hosts: [\"*\"]\n---\n"),
        );
    }
    y.push_str(&service_entry("app", "x", 80, "HTTP", &[(be, "app=app")]));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: app, namespace: x}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: app}}]\n");
    y
}

async fn backend_of(port: u16, ip: &str) -> String {
    get(&client(), &format!("http://{ip}:{port}/"), "x")
        .await
        .backend()
}

#[tokio::test(flavor = "multi_thread")]
async fn proxies_converge_over_delta_and_sotw_and_status_shows_them() {
    let (v1, v2) = (backend("v1").await, backend("v2").await);
    let port = free_port();
    let dir = TempDir::new("control");
    let cfg = dir.0.join("cfg");
    write_dir(&cfg, &mesh(port, v1.addr, None));
    let control = Control::start(&cfg, None).await;
    let delta = Bosun::with_xds(
        control.xds,
        &[
            "--mode",
            "gateway",
            "--gateway-address",
            "127.0.0.1",
            "--node-id",
            "gw-delta",
        ],
    );
    let sotw = Bosun::with_xds(
        control.xds,
        &[
            "--mode",
            "gateway",
            "--gateway-address",
            "127.0.0.2",
            "--node-id",
            "gw-sotw",
            "--xds-sotw",
        ],
    );
    delta.wait_ready().await;
    sotw.wait_ready().await;
    assert_eq!(backend_of(port, "127.0.0.1").await, "v1");
    assert_eq!(backend_of(port, "127.0.0.2").await, "v1");

    write_dir(&cfg, &mesh(port, v2.addr, None));
    eventually("both proxies route to v2", || async {
        backend_of(port, "127.0.0.1").await == "v2" && backend_of(port, "127.0.0.2").await == "v2"
    })
    .await;
    eventually("status shows both synced", || async {
        let ps = control.proxies().await;
        ps.len() == 2
            && ps.iter().all(|p| {
                !p["latest_version"].as_str().unwrap_or("").is_empty()
                    && p["acked_version"] == p["latest_version"]
            })
    })
    .await;
    let ps = control.proxies().await;
    let streams: Vec<&str> = ps.iter().filter_map(|p| p["stream"].as_str()).collect();
    assert_eq!(streams, vec!["delta", "sotw"], "{ps:?}");
    let versions: Vec<&str> = ps
        .iter()
        .filter_map(|p| p["acked_version"].as_str())
        .collect();
    assert_eq!(
        versions,
        vec![
            delta.version().await.as_str(),
            sotw.version().await.as_str()
        ]
    );

    // An invalid change never reaches a proxy.
    write_dir(
        &cfg,
        &mesh(port, v1.addr, None).replace("{host: app}", "{host: nowhere}"),
    );
    eventually("control refuses the bad config", || async {
        control.log_text().contains("nowhere")
    })
    .await;
    assert_eq!(backend_of(port, "127.0.0.1").await, "v2");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_the_proxy_cannot_apply_is_nacked_and_the_old_one_keeps_serving() {
    let be = backend("app").await;
    let (port, taken) = (free_port(), free_port());
    // Something else already listens where the new config wants a listener.
    let _squatter = std::net::TcpListener::bind(("127.0.0.3", taken)).expect("bind");
    let dir = TempDir::new("control");
    let cfg = dir.0.join("cfg");
    write_dir(&cfg, &mesh(port, be.addr, None));
    let control = Control::start(&cfg, None).await;
    let proxy = Bosun::with_xds(
        control.xds,
        &[
            "--mode",
            "gateway",
            "--gateway-address",
            "127.0.0.3",
            "--node-id",
            "gw-nack",
        ],
    );
    proxy.wait_ready().await;
    let good = proxy.version().await;
    write_dir(&cfg, &mesh(port, be.addr, Some(taken)));
    eventually("the NACK is reported", || async {
        control.proxies().await.iter().any(|p| {
            p["last_nack"]
                .as_str()
                .is_some_and(|n| n.contains("cannot listen"))
        })
    })
    .await;
    assert_eq!(proxy.version().await, good);
    assert_eq!(backend_of(port, "127.0.0.3").await, "app");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bosun"))
        .args(["status", "--control", &control.admin.to_string()])
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("gw-nack") && text.contains("STALE") && text.contains("cannot listen"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn proxies_keep_serving_without_the_control_service_and_resync_when_it_returns() {
    let (v1, v2) = (backend("v1").await, backend("v2").await);
    let port = free_port();
    let dir = TempDir::new("control");
    let cfg = dir.0.join("cfg");
    write_dir(&cfg, &mesh(port, v1.addr, None));
    let mut control = Control::start(&cfg, None).await;
    let xds = control.xds;
    let proxy = Bosun::with_xds(
        xds,
        &[
            "--mode",
            "gateway",
            "--gateway-address",
            "127.0.0.4",
            "--node-id",
            "gw-k",
        ],
    );
    proxy.wait_ready().await;
    control.kill();
    for _ in 0..20 {
        assert_eq!(backend_of(port, "127.0.0.4").await, "v1");
    }
    write_dir(&cfg, &mesh(port, v2.addr, None));
    let _control = Control::start(&cfg, Some(xds)).await;
    eventually(
        "the proxy resyncs from the restarted control service",
        || async { backend_of(port, "127.0.0.4").await == "v2" },
    )
    .await;
    // One applied config per distinct version: the reconnect itself did not reload.
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(&m, "bosun_config_applied_total", &[]),
        2.0,
        "{m}"
    );
}

fn gateway_node(id: &str) -> Node {
    let mut fields = BTreeMap::new();
    fields.insert(
        "MODE".to_string(),
        Value {
            kind: Some(Kind::StringValue("gateway".into())),
        },
    );
    fields.insert(
        "GATEWAY_ADDRESS".to_string(),
        Value {
            kind: Some(Kind::StringValue("127.0.0.1".into())),
        },
    );
    Node {
        id: id.into(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

/// A raw delta ADS stream subscribed (wildcard) to every type as `node`:
/// the request sender (for ACKs) and the responses.
async fn delta_stream(
    xds: SocketAddr,
    node: Node,
) -> (
    tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<bosun_xds_proto::discovery::DeltaDiscoveryResponse>,
) {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    for t in type_url::ALL {
        tx.send(DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: t.into(),
            ..Default::default()
        })
        .await
        .expect("send");
    }
    let stream = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    (tx, stream)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delta_push_of_one_changed_endpoint_carries_only_that_resource() {
    let (a, b) = (backend("a").await, backend("b").await);
    let port = free_port();
    let dir = TempDir::new("control");
    let cfg = dir.0.join("cfg");
    // Two services, so that one endpoint change leaves another CLA untouched.
    let two = |first: SocketAddr| {
        let mut y = mesh(port, first, None);
        y.push_str("---\n");
        y.push_str(&service_entry(
            "other",
            "x",
            80,
            "HTTP",
            &[(b.addr, "app=other")],
        ));
        y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: other, namespace: x}\nspec:\n  hosts: [other.example]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: other}}]\n");
        y
    };
    write_dir(&cfg, &two(a.addr));
    let control = Control::start(&cfg, None).await;
    let (tx, mut stream) = delta_stream(control.xds, gateway_node("raw")).await;
    let mut first = BTreeMap::new();
    for _ in 0..4 {
        let r = stream.message().await.expect("ok").expect("response");
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await
        .expect("ack");
        first.insert(r.type_url.clone(), r);
    }
    assert_eq!(first[type_url::CLUSTER_LOAD_ASSIGNMENT].resources.len(), 2);
    assert_eq!(first[type_url::CLUSTER].resources.len(), 2);
    assert!(!first[type_url::LISTENER].resources.is_empty());

    // Move service "app" to another endpoint.
    let moved: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    write_dir(&cfg, &two(moved));
    // The push is one response: the changed type only, its nonce marking
    // the end of the push; the unchanged types are not sent at all.
    let cla = tokio::time::timeout(std::time::Duration::from_secs(5), stream.message())
        .await
        .expect("a push within 5 s")
        .expect("ok")
        .expect("response");
    assert_eq!(cla.type_url, type_url::CLUSTER_LOAD_ASSIGNMENT);
    assert!(
        cla.nonce.ends_with(bosun_xds_proto::PUSH_END),
        "{}",
        cla.nonce
    );
    let more = tokio::time::timeout(std::time::Duration::from_millis(500), stream.message()).await;
    assert!(more.is_err(), "nothing else is sent: {more:?}");
    assert_eq!(
        cla.resources.len(),
        1,
        "only the changed endpoint set: {cla:?}"
    );
    assert_eq!(
        cla.resources[0].name,
        "outbound|80||app.x.svc.cluster.local"
    );
    assert!(cla.removed_resources.is_empty());
    assert_ne!(
        cla.system_version_info,
        first[type_url::CLUSTER].system_version_info
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stock_python_xds_client_speaks_to_the_control_service() {
    let be = backend("app").await;
    let dir = TempDir::new("control");
    let cfg = dir.0.join("cfg");
    write_dir(&cfg, &mesh(free_port(), be.addr, None));
    let control = Control::start(&cfg, None).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/xds_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .args([control.xds.to_string(), control.admin.to_string()])
        .output()
        .await
        .expect("python3 (test.sh installs grpcio and xds-protos)");
    assert!(
        out.status.success(),
        "{}\n{}\ncontrol log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        control.log_text()
    );
}

/// The version a control service holds for a gateway node, read as a raw client.
async fn version_at(xds: SocketAddr) -> String {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(gateway_node("probe")),
        type_url: type_url::CLUSTER.into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let mut s = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    s.message()
        .await
        .expect("ok")
        .expect("response")
        .system_version_info
}

#[tokio::test(flavor = "multi_thread")]
async fn two_control_replicas_on_one_etcd_agree_and_a_proxy_fails_over_without_a_reload() {
    let (v1, v2) = (backend("v1").await, backend("v2").await);
    let port = free_port();
    let etcd = Etcd::start().await;
    // One resource per key: <prefix>/<kind>/<namespace>/<name>, YAML or JSON.
    etcd.put("/mesh/Gateway/x/gw", &gateway("x", port)).await;
    etcd.put(
        "/mesh/ServiceEntry/x/app",
        &service_entry("app", "x", 80, "HTTP", &[(v1.addr, "app=app")]),
    )
    .await;
    let vs = serde_json::json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "app", "namespace": "x"},
        "spec": {"hosts": ["*"], "gateways": ["gw"], "http": [{"route": [{"destination": {"host": "app"}}]}]}
    });
    etcd.put("/mesh/VirtualService/x/app", &vs.to_string())
        .await;
    let logs = TempDir::new("etcd-controls");
    let mut a = Control::start_etcd(&etcd.url, "/mesh", &logs.0.join("a")).await;
    let b = Control::start_etcd(&etcd.url, "/mesh", &logs.0.join("b")).await;
    assert_eq!(
        version_at(a.xds).await,
        version_at(b.xds).await,
        "same etcd, same version"
    );

    let replicas = format!("{},{}", a.xds, b.xds);
    let proxy = Bosun::with_xds_list(
        &replicas,
        &[
            "--mode",
            "gateway",
            "--gateway-address",
            "127.0.0.5",
            "--node-id",
            "gw-etcd",
        ],
    );
    proxy.wait_ready().await;
    assert_eq!(backend_of(port, "127.0.0.5").await, "v1");
    a.kill();
    eventually("the proxy reconnects to replica b", || async {
        b.proxies()
            .await
            .iter()
            .any(|p| p["node_id"] == "gw-etcd" && p["acked_version"] == p["latest_version"])
    })
    .await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(&m, "bosun_config_applied_total", &[]),
        1.0,
        "failover without a reload: {m}"
    );
    // A change in etcd reaches the proxy through the surviving replica.
    etcd.put(
        "/mesh/ServiceEntry/x/app",
        &service_entry("app", "x", 80, "HTTP", &[(v2.addr, "app=app")]),
    )
    .await;
    eventually("the change in etcd reaches the proxy", || async {
        backend_of(port, "127.0.0.5").await == "v2"
    })
    .await;
}

fn sidecar_node(id: &str, namespace: &str) -> Node {
    let mut fields = BTreeMap::new();
    for (k, v) in [("MODE", "sidecar"), ("NAMESPACE", namespace)] {
        fields.insert(
            k.to_string(),
            Value {
                kind: Some(Kind::StringValue(v.into())),
            },
        );
    }
    Node {
        id: id.into(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_config_goes_out_in_chunks_and_a_proxy_applies_it_whole() {
    let be = backend("last").await;
    let other: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let dir = TempDir::new("control");
    let cfg = dir.0.join("cfg");
    // 300 services of 5 endpoints: far more than one chunk of each type.
    let mut y = String::new();
    for i in 0..300 {
        let ep = if i == 299 { be.addr } else { other };
        y.push_str(&service_entry(
            &format!("svc-{i}"),
            "x",
            80,
            "HTTP",
            &[(ep, "app=a,version=v1"); 5],
        ));
    }
    write_dir(&cfg, &y);
    let control = Control::start(&cfg, None).await;

    // A raw delta client sees each type in chunks: every nonce but the last
    // of a type ends in MORE, all at one version, together the whole set.
    let (tx, mut stream) = delta_stream(control.xds, sidecar_node("raw", "x")).await;
    let mut chunks: BTreeMap<String, Vec<_>> = BTreeMap::new();
    let mut done = std::collections::BTreeSet::new();
    while done.len() < 4 {
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
            .await
            .expect("responses within 10 s")
            .expect("ok")
            .expect("response");
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await
        .expect("ack");
        if !r.nonce.ends_with(bosun_xds_proto::MORE) {
            done.insert(r.type_url.clone());
        }
        chunks.entry(r.type_url.clone()).or_default().push(r);
    }
    let cla = &chunks[type_url::CLUSTER_LOAD_ASSIGNMENT];
    assert!(cla.len() > 2, "{} CLA responses", cla.len());
    let (last, rest) = cla.split_last().expect("chunks");
    assert!(
        rest.iter()
            .all(|r| r.nonce.ends_with(bosun_xds_proto::MORE)),
        "{:?}",
        cla.iter().map(|r| &r.nonce).collect::<Vec<_>>()
    );
    assert!(!last.nonce.ends_with(bosun_xds_proto::MORE));
    assert!(
        cla.iter()
            .all(|r| r.system_version_info == last.system_version_info)
    );
    for r in cla {
        let bytes: usize = r
            .resources
            .iter()
            .map(|x| {
                x.resource.as_ref().map_or(0, |a| a.value.len()) + x.name.len() + x.version.len()
            })
            .sum();
        let largest = r
            .resources
            .iter()
            .map(|x| {
                x.resource.as_ref().map_or(0, |a| a.value.len()) + x.name.len() + x.version.len()
            })
            .max()
            .unwrap_or(0);
        assert!(
            bytes <= bosun_xds_proto::CHUNK_BYTES + largest,
            "{bytes} bytes"
        );
    }
    let names: std::collections::BTreeSet<&str> = cla
        .iter()
        .flat_map(|r| r.resources.iter().map(|x| x.name.as_str()))
        .collect();
    assert_eq!(names.len(), 300);

    // A Bosun sidecar applies the set once, whole: ready means the last
    // chunk's service routes, and nothing was refused on the way.
    let out_port = free_port();
    let proxy = Bosun::with_xds(
        control.xds,
        &[
            "--mode",
            "sidecar",
            "--namespace",
            "x",
            "--node-id",
            "big",
            "--outbound-address",
            &format!("127.0.0.1:{out_port}"),
        ],
    );
    proxy.wait_ready().await;
    let r = get(
        &crate::harness::client(),
        &format!("http://127.0.0.1:{out_port}/"),
        "svc-299.x.svc.cluster.local",
    )
    .await;
    assert_eq!(r.backend(), "last", "{}", r.body);
    assert!(!proxy.log_text().contains("NACK"), "{}", proxy.log_text());
    eventually("status shows the proxy synced", || async {
        control.proxies().await.iter().any(|p| {
            p["node_id"] == "big"
                && !p["latest_version"].as_str().unwrap_or("").is_empty()
                && p["acked_version"] == p["latest_version"]
        })
    })
    .await;
}
