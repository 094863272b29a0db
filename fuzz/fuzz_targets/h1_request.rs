//! The downstream HTTP/1.1 request path: any bytes from a client go through
//! hyper's server with Bosun's limits, and each parsed request through
//! `decide` (Host checks, routing, rewrites) and a full read of its body
//! (chunked decoding). Panics, and a request routed past the Host check
//! without exactly one Host, are failures.
#![no_main]

use std::sync::OnceLock;

use bosun_proxy::cluster::EndpointRegistry;
use bosun_proxy::config::{BuildContext, Snapshot};
use bosun_proxy::http::decide::{ConnContext, Decision, decide};
use bosun_proxy::identity::ProxyIdentity;
use bosun_proxy::pool::{PoolOptions, Pools};
use bosun_xds_proto::config as pb;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fn snapshot() -> &'static Snapshot {
    static SNAP: OnceLock<Snapshot> = OnceLock::new();
    SNAP.get_or_init(|| {
        let cfg = pb::ProxyConfig {
            version: "fuzz".into(),
            listeners: vec![pb::Listener {
                name: "gw".into(),
                address: "127.0.0.1".into(),
                port: 8080,
                protocol: pb::ListenerProtocol::Http as i32,
                direction: pb::TrafficDirection::Gateway as i32,
                route_configuration: "rc".into(),
                ..Default::default()
            }],
            route_configurations: vec![pb::RouteConfiguration {
                name: "rc".into(),
                virtual_hosts: vec![pb::VirtualHost {
                    name: "all".into(),
                    domains: vec!["*".into()],
                    routes: vec![pb::Route {
                        name: "r".into(),
                        matches: vec![pb::RouteMatch {
                            uri: Some(pb::StringMatch {
                                kind: Some(pb::string_match::Kind::Prefix("/a".into())),
                            }),
                            ..Default::default()
                        }],
                        action: Some(pb::route::Action::Route(pb::RouteAction {
                            clusters: vec![pb::WeightedCluster {
                                cluster: "c".into(),
                                weight: 1,
                            }],
                            uri_rewrite: "/b".into(),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                }],
            }],
            clusters: vec![pb::Cluster {
                name: "c".into(),
                ..Default::default()
            }],
            load_assignments: vec![],
        };
        let id = ProxyIdentity::default();
        let ctx = BuildContext {
            identity: &id,
            endpoints: &EndpointRegistry::default(),
            pools: &Pools::new(PoolOptions::new(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(1),
            )),
            dns: None,
        };
        Snapshot::build(cfg, &ctx).expect("fuzz snapshot")
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let snap = snapshot();
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
            let (parts, body) = req.into_parts();
            let conn = ConnContext::new(
                "10.0.0.1:1000".parse().expect("addr"),
                "127.0.0.1:8080".parse().expect("addr"),
            );
            let d = decide(snap, &conn, &parts, &mut rand::rng());
            if let Decision::Forward(_) = d.decision {
                assert!(
                    parts.version != http::Version::HTTP_11
                        || parts.headers.get_all(http::header::HOST).iter().count() == 1,
                    "forwarded an HTTP/1.1 request without exactly one Host"
                );
            }
            let _ = body.collect().await;
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                bytes::Bytes,
            >::new()))
        });
        let mut b = hyper::server::conn::http1::Builder::new();
        b.max_header_size(60 * 1024);
        let serve = b.serve_connection(hyper_util::rt::TokioIo::new(server), svc);
        let feed = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Drain what the server writes so it never blocks.
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut client, &mut sink).await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            tokio::join!(serve, feed)
        })
        .await;
    });
});
