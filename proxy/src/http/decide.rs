//! *decide*: a pure function from the snapshot, the connection and the
//! request head to what happens next: a local reply, or a plan to forward.
//! No sockets, no clocks; randomness (the weighted pick, a generated hash
//! cookie) comes from the caller's rng, so tests can fix it.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use std::time::Duration;

use http::HeaderMap;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{StatusCode, Version};
use rand::{Rng, RngExt};

use crate::cluster::{Cluster, HashKey, UpstreamProtocol, hash_bytes};
use crate::config::{Direction, ListenerKind, Snapshot};
use crate::flags::Flags;
use crate::http::headers::{cookie_value, is_upgrade};
use crate::metrics::LabelSet;
use crate::policy::{Abort, roll};
use crate::route::{Action, HeaderOps, RequestView, Route, RouteAction, rewrite_path, strip_port};

/// What the request path knows about the downstream connection.
#[derive(Debug, Clone)]
pub struct ConnContext {
    pub peer: SocketAddr,
    /// The listener's address (the original destination, with capture).
    pub local: SocketAddr,
    /// The peer's IP, rendered once for `x-forwarded-for`.
    pub peer_ip: HeaderValue,
    /// Set when the connection is TLS: who the peer proved to be.
    pub tls: Option<Arc<crate::http::serve::DownstreamTls>>,
    /// Where the client sent it, when capture redirected it here.
    pub original_dst: Option<SocketAddr>,
}

impl ConnContext {
    pub fn new(peer: SocketAddr, local: SocketAddr) -> Self {
        ConnContext {
            peer,
            local,
            peer_ip: HeaderValue::try_from(peer.ip().to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            tls: None,
            original_dst: None,
        }
    }
}

/// A reply the proxy makes itself.
pub struct LocalReply<'s> {
    pub status: StatusCode,
    pub body: Bytes,
    pub flags: Flags,
    pub location: Option<HeaderValue>,
    pub labels: Arc<LabelSet>,
    pub response_ops: Option<&'s HeaderOps>,
    /// More headers (CORS preflight answers, gRPC status of a fault abort).
    pub headers: Option<Box<HeaderMap>>,
}

/// Where and how to forward. The endpoint is picked by *forward* (load,
/// and later circuit breakers and outlier state, are live state).
pub struct Plan<'s> {
    pub route: &'s Route,
    pub action: &'s RouteAction,
    pub cluster: &'s Arc<Cluster>,
    /// The request's hash key for ring hash and Maglev.
    pub hash: Option<u64>,
    /// A generated hash cookie to set on the response.
    pub set_cookie: Option<HeaderValue>,
    pub path_and_query: PathAndQuery,
    /// The upstream `Host` (rewritten or the request's authority).
    pub host: HeaderValue,
    pub upgrade: bool,
    pub use_h2: bool,
    /// Fault injection: wait this long first (DI) ...
    pub delay: Option<Duration>,
    /// ... then abort instead of forwarding (FI).
    pub abort: Option<Abort>,
    /// CORS: the allowed `Origin` to echo on the response.
    pub cors_origin: Option<HeaderValue>,
    /// The request is gRPC (local replies become trailers-only gRPC).
    pub grpc: bool,
}

pub enum Decision<'s> {
    Local(LocalReply<'s>),
    Forward(Plan<'s>),
}

pub struct Decided<'s> {
    pub decision: Decision<'s>,
    pub route_name: Option<&'s Arc<str>>,
}

fn local<'s>(
    status: StatusCode,
    body: &'static str,
    flags: Flags,
    labels: Arc<LabelSet>,
) -> Decision<'s> {
    Decision::Local(LocalReply {
        status,
        body: Bytes::from_static(body.as_bytes()),
        flags,
        location: None,
        labels,
        response_ops: None,
        headers: None,
    })
}

/// The request's authority: `:authority` (HTTP/2, absolute-form URIs) or `Host`.
pub fn authority(head: &http::request::Parts) -> HeaderValue {
    match head.uri.authority() {
        Some(a) => HeaderValue::try_from(a.as_str()).unwrap_or(HeaderValue::from_static("")),
        None => head
            .headers
            .get(header::HOST)
            .cloned()
            .unwrap_or(HeaderValue::from_static("")),
    }
}

/// RFC 9112 3.2: an HTTP/1.1 request has exactly one `Host`.
fn host_error(head: &http::request::Parts) -> Option<&'static str> {
    if head.version != Version::HTTP_11 {
        return None;
    }
    let mut hosts = head.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => Some("missing Host header\n"),
        (Some(_), Some(_)) => Some("duplicate Host header\n"),
        (Some(_), None) => None,
    }
}

pub fn decide<'s, R: Rng + ?Sized>(
    snap: &'s Snapshot,
    conn: &ConnContext,
    head: &http::request::Parts,
    rng: &mut R,
) -> Decided<'s> {
    let listener = snap.listeners.get(&conn.local);
    let inbound = listener.is_some_and(|l| l.direction == Direction::Inbound);
    // Cloned only for a local reply (an Arc clone is an atomic add).
    let no_route = || snap.no_route_labels(inbound);
    let done = |decision| Decided {
        decision,
        route_name: None,
    };
    if let Some(msg) = host_error(head) {
        return done(local(
            StatusCode::BAD_REQUEST,
            msg,
            Flags::DownstreamProtocolError,
            no_route(),
        ));
    }
    let Some(listener) = listener else {
        return done(local(StatusCode::NOT_FOUND, "", Flags::NoRoute, no_route()));
    };
    let ListenerKind::Http { route_table } = &listener.kind else {
        return done(local(StatusCode::NOT_FOUND, "", Flags::NoRoute, no_route()));
    };
    let authority_hv = authority(head);
    let authority: &str = authority_hv.to_str().unwrap_or("");
    // Captured: the port the client dialled (an authority without a port
    // names the host on it, as Istio's per-port route tables do).
    let dialled = conn.original_dst.filter(|_| listener.capture.is_some());
    let explicit_port = authority
        .bytes()
        .rposition(|b| b == b':')
        .and_then(|i| authority[i + 1..].parse::<u16>().ok());
    let port = if listener.direction == Direction::Outbound {
        explicit_port.unwrap_or(dialled.map_or(80, |d| d.port()))
    } else {
        dialled.map_or(listener.addr.port(), |d| d.port())
    };
    let with_port;
    let lookup = match dialled {
        Some(d)
            if explicit_port.is_none()
                && d.port() != 80
                && listener.direction == Direction::Outbound =>
        {
            with_port = format!("{authority}:{}", d.port());
            with_port.as_str()
        }
        _ => authority,
    };
    let view = RequestView {
        path: head.uri.path(),
        query: head.uri.query(),
        authority,
        method: &head.method,
        scheme: "http",
        headers: &head.headers,
        port,
    };
    let Some((route, matched)) = route_table
        .virtual_host(lookup)
        .and_then(|vh| vh.route(&view))
    else {
        return done(local(StatusCode::NOT_FOUND, "", Flags::NoRoute, no_route()));
    };
    let decided = |decision| Decided {
        decision,
        route_name: Some(&route.name),
    };
    let ra = match &route.action {
        Action::Direct { status, body } => {
            return decided(Decision::Local(LocalReply {
                status: *status,
                body: body.clone(),
                flags: Flags::None,
                location: None,
                labels: no_route(),
                response_ops: Some(&route.response_ops),
                headers: None,
            }));
        }
        Action::Redirect(r) => {
            let scheme = r.scheme.as_deref().unwrap_or("http");
            let host = r
                .authority
                .as_deref()
                .unwrap_or_else(|| strip_port(authority));
            let host_port = match (r.port, r.authority.is_some()) {
                (Some(p), _) => format!("{}:{p}", strip_port(host)),
                (None, false) if authority.len() != strip_port(authority).len() => {
                    authority.to_string()
                }
                _ => host.to_string(),
            };
            let path = r.uri.as_deref().unwrap_or(head.uri.path());
            let query = head
                .uri
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            let loc = format!("{scheme}://{host_port}{path}{query}");
            return decided(Decision::Local(LocalReply {
                status: r.status,
                body: Bytes::new(),
                flags: Flags::None,
                location: HeaderValue::try_from(loc).ok(),
                labels: no_route(),
                response_ops: Some(&route.response_ops),
                headers: None,
            }));
        }
        Action::Route(ra) => ra,
    };
    let cluster = ra.clusters.pick_with(rng);
    let grpc = is_grpc(&head.headers);
    let mut cors_origin = None;
    if let Some(cors) = &ra.policy.cors
        && let Some(origin) = head.headers.get(header::ORIGIN).filter(|o| !o.is_empty())
    {
        let allowed = cors.allows(origin.to_str().unwrap_or(""));
        let acrm = head.headers.get(header::ACCESS_CONTROL_REQUEST_METHOD);
        if head.method == http::Method::OPTIONS && acrm.is_some_and(|v| !v.is_empty()) {
            // A preflight: answered here unless its origin does not match
            // and unmatched preflights go upstream (Istio's FORWARD).
            if allowed || !cors.forward_unmatched {
                let mut h = cors.preflight_headers(
                    origin,
                    acrm,
                    head.headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS),
                );
                if !allowed {
                    h.remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
                }
                return decided(Decision::Local(LocalReply {
                    status: StatusCode::OK,
                    body: Bytes::new(),
                    flags: Flags::None,
                    location: None,
                    labels: cluster.no_endpoint_labels.clone(),
                    response_ops: Some(&route.response_ops),
                    headers: Some(Box::new(h)),
                }));
            }
        } else if allowed {
            cors_origin = Some(origin.clone());
        }
    }
    let mut delay = None;
    let mut abort = None;
    if let Some(f) = &ra.policy.fault {
        if let Some((d, share)) = f.delay
            && roll(share, rng)
        {
            delay = Some(d);
        }
        if let Some((a, share)) = &f.abort
            && roll(*share, rng)
        {
            if delay.is_none() {
                return decided(Decision::Local(fault_reply(
                    a,
                    grpc,
                    cluster.no_endpoint_labels.clone(),
                )));
            }
            abort = Some(a.clone());
        }
    }
    let mut set_cookie = None;
    let hash = match &cluster.hash {
        None => None,
        Some(HashKey::Header(h)) => head.headers.get(h).map(|v| hash_bytes(v.as_bytes())),
        Some(HashKey::SourceIp) => Some(hash_bytes(conn.peer.ip().to_string().as_bytes())),
        Some(HashKey::Query(q)) => head.uri.query().and_then(|qs| {
            qs.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == q).then(|| hash_bytes(v.as_bytes()))
            })
        }),
        Some(HashKey::Cookie {
            name,
            path,
            ttl_seconds,
        }) => match cookie_value(&head.headers, name) {
            Some(v) => Some(hash_bytes(v.as_bytes())),
            None if *ttl_seconds > 0 => {
                let v: u64 = rng.random();
                let v = format!("{v:016x}");
                let path = if path.is_empty() {
                    String::new()
                } else {
                    format!("; Path={path}")
                };
                set_cookie = HeaderValue::try_from(format!(
                    "{name}={v}; Max-Age={ttl_seconds}{path}; HttpOnly"
                ))
                .ok();
                Some(hash_bytes(v.as_bytes()))
            }
            None => None,
        },
    };
    let path_and_query = match &ra.uri_rewrite {
        Some(rw) => {
            let p = rewrite_path(head.uri.path(), matched, rw);
            let pq = match head.uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            PathAndQuery::try_from(pq).ok()
        }
        None => Some(
            head.uri
                .path_and_query()
                .cloned()
                .unwrap_or(PathAndQuery::from_static("/")),
        ),
    };
    let Some(path_and_query) = path_and_query else {
        return decided(local(
            StatusCode::BAD_REQUEST,
            "bad path",
            Flags::DownstreamProtocolError,
            cluster.no_endpoint_labels.clone(),
        ));
    };
    let upgrade = is_upgrade(head.version, &head.headers);
    let use_h2 = match cluster.protocol {
        UpstreamProtocol::Http2 => true,
        UpstreamProtocol::Downstream => head.version == Version::HTTP_2,
        _ => false,
    } && !upgrade;
    decided(Decision::Forward(Plan {
        route,
        action: ra,
        cluster,
        hash,
        set_cookie,
        path_and_query,
        host: ra.authority_rewrite.clone().unwrap_or(authority_hv),
        upgrade,
        use_h2,
        delay,
        abort,
        cors_origin,
        grpc,
    }))
}

/// A gRPC request (or response): `content-type: application/grpc[+...]`.
pub fn is_grpc(h: &http::HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Envoy's HTTP status → gRPC status mapping for local replies to gRPC requests.
fn grpc_of_http(s: StatusCode) -> u32 {
    match s.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// A fault abort, as Envoy's fault filter answers: the status with body
/// "fault filter abort", or for gRPC a trailers-only response (HTTP 200,
/// `grpc-status`, `grpc-message`).
pub fn fault_reply<'s>(a: &Abort, grpc: bool, labels: Arc<LabelSet>) -> LocalReply<'s> {
    let code = match (a, grpc) {
        (Abort::Grpc(c), _) => Some(*c),
        (Abort::Http(s), true) => Some(grpc_of_http(*s)),
        (Abort::Http(_), false) => None,
    };
    match code {
        Some(c) => {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(c));
            h.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            LocalReply {
                status: StatusCode::OK,
                body: Bytes::new(),
                flags: Flags::FaultInjected,
                location: None,
                labels,
                response_ops: None,
                headers: Some(Box::new(h)),
            }
        }
        None => LocalReply {
            status: match a {
                Abort::Http(s) => *s,
                Abort::Grpc(_) => StatusCode::OK,
            },
            body: Bytes::from_static(b"fault filter abort"),
            flags: Flags::FaultInjected,
            location: None,
            labels,
            response_ops: None,
            headers: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bosun_xds_proto::config as pb;
    use rand::SeedableRng;

    use crate::cluster::EndpointRegistry;
    use crate::config::BuildContext;
    use crate::identity::ProxyIdentity;
    use crate::pool::{PoolOptions, Pools};

    const LISTEN: &str = "127.0.0.1:18000";

    /// A snapshot built as a proxy builds one, with fresh state.
    fn build(
        cfg: pb::ProxyConfig,
        id: &ProxyIdentity,
    ) -> Result<Snapshot, crate::error::RejectError> {
        let ctx = BuildContext {
            identity: id,
            endpoints: &EndpointRegistry::default(),
            pools: &Pools::new(PoolOptions::new(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(1),
            )),
            dns: None,
            tls: &crate::tls::Store::new(),
        };
        Snapshot::build(cfg, &ctx)
    }

    fn wc(cluster: &str, weight: u32) -> pb::WeightedCluster {
        pb::WeightedCluster {
            cluster: cluster.into(),
            weight,
        }
    }

    fn prefix(p: &str) -> Option<pb::StringMatch> {
        Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Prefix(p.into())),
        })
    }

    fn cluster(name: &str, port: u32) -> (pb::Cluster, pb::ClusterLoadAssignment) {
        (
            pb::Cluster {
                name: name.into(),
                protocol: pb::UpstreamProtocol::Http1 as i32,
                ..Default::default()
            },
            pb::ClusterLoadAssignment {
                cluster: name.into(),
                endpoints: vec![pb::Endpoint {
                    address: "127.0.0.1".into(),
                    port,
                    ..Default::default()
                }],
            },
        )
    }

    /// A gateway listener: `/canary` split 90/10 between v1 and v2 with a
    /// prefix rewrite, `/moved` redirected, `/teapot` answered locally.
    fn snapshot() -> Snapshot {
        let route = |name: &str, p: &str, action| pb::Route {
            name: name.into(),
            matches: vec![pb::RouteMatch {
                uri: prefix(p),
                ..Default::default()
            }],
            action: Some(action),
            ..Default::default()
        };
        let (c1, a1) = cluster("v1", 9001);
        let (c2, a2) = cluster("v2", 9002);
        let cfg = pb::ProxyConfig {
            version: "t".into(),
            listeners: vec![pb::Listener {
                name: "gw".into(),
                address: "127.0.0.1".into(),
                port: 18000,
                protocol: pb::ListenerProtocol::Http as i32,
                direction: pb::TrafficDirection::Gateway as i32,
                route_configuration: "rc".into(),
                ..Default::default()
            }],
            route_configurations: vec![pb::RouteConfiguration {
                name: "rc".into(),
                virtual_hosts: vec![pb::VirtualHost {
                    name: "shop".into(),
                    domains: vec!["shop.example".into()],
                    routes: vec![
                        route(
                            "canary",
                            "/canary",
                            pb::route::Action::Route(pb::RouteAction {
                                clusters: vec![wc("v1", 90), wc("v2", 10)],
                                uri_rewrite: "/app".into(),
                                ..Default::default()
                            }),
                        ),
                        route(
                            "moved",
                            "/moved",
                            pb::route::Action::Redirect(pb::Redirect {
                                uri: "/new".into(),
                                status: 301,
                                ..Default::default()
                            }),
                        ),
                        route(
                            "teapot",
                            "/teapot",
                            pb::route::Action::DirectResponse(pb::DirectResponse {
                                status: 418,
                                body: b"short and stout".to_vec(),
                            }),
                        ),
                    ],
                }],
            }],
            clusters: vec![c1, c2],
            load_assignments: vec![a1, a2],
        };
        let id = ProxyIdentity::default();
        build(cfg, &id).expect("valid snapshot")
    }

    fn conn() -> ConnContext {
        ConnContext::new(
            "10.1.2.3:5555".parse().expect("addr"),
            LISTEN.parse().expect("addr"),
        )
    }

    fn head(req: http::request::Builder) -> http::request::Parts {
        req.body(()).expect("request").into_parts().0
    }

    fn get(path: &str, host: &str) -> http::request::Parts {
        head(http::Request::get(path).header("host", host))
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    fn local_status(d: &Decided<'_>) -> Option<(u16, Flags)> {
        match &d.decision {
            Decision::Local(l) => Some((l.status.as_u16(), l.flags)),
            Decision::Forward(_) => None,
        }
    }

    #[test]
    fn a_matching_route_becomes_a_plan_with_the_rewrite_and_host() {
        let snap = snapshot();
        let d = decide(
            &snap,
            &conn(),
            &get("/canary/x?q=1", "shop.example"),
            &mut rng(),
        );
        assert_eq!(d.route_name.map(|n| &**n), Some("canary"));
        let Decision::Forward(plan) = d.decision else {
            panic!("expected a forward plan");
        };
        assert_eq!(plan.path_and_query.as_str(), "/app/x?q=1");
        assert_eq!(plan.host, "shop.example");
        assert!(!plan.use_h2 && !plan.upgrade);
    }

    #[test]
    fn the_weighted_pick_follows_the_weights() {
        let snap = snapshot();
        let mut r = rng();
        let mut v2 = 0;
        for _ in 0..10_000 {
            let d = decide(&snap, &conn(), &get("/canary", "shop.example"), &mut r);
            if let Decision::Forward(p) = d.decision
                && p.cluster.name == "v2"
            {
                v2 += 1;
            }
        }
        assert!((800..1200).contains(&v2), "v2 got {v2} of 10000");
    }

    #[test]
    fn local_replies_no_route_redirect_and_direct_response() {
        let snap = snapshot();
        let mut r = rng();
        let nr = decide(&snap, &conn(), &get("/other", "shop.example"), &mut r);
        assert_eq!(local_status(&nr), Some((404, Flags::NoRoute)));
        let unknown_host = decide(&snap, &conn(), &get("/canary", "evil.example"), &mut r);
        assert_eq!(local_status(&unknown_host), Some((404, Flags::NoRoute)));
        let moved = decide(
            &snap,
            &conn(),
            &get("/moved?a=b", "shop.example:8080"),
            &mut r,
        );
        let Decision::Local(l) = moved.decision else {
            panic!("redirect is local");
        };
        assert_eq!(l.status, 301);
        assert_eq!(
            l.location.as_ref().map(|v| v.to_str().unwrap_or("")),
            Some("http://shop.example:8080/new?a=b")
        );
        let tea = decide(&snap, &conn(), &get("/teapot", "shop.example"), &mut r);
        assert_eq!(local_status(&tea), Some((418, Flags::None)));
    }

    #[test]
    fn http11_needs_exactly_one_host() {
        let snap = snapshot();
        let mut r = rng();
        let none = head(http::Request::get("/canary"));
        assert_eq!(
            local_status(&decide(&snap, &conn(), &none, &mut r)),
            Some((400, Flags::DownstreamProtocolError))
        );
        let two = head(
            http::Request::get("/canary")
                .header("host", "shop.example")
                .header("host", "evil.example"),
        );
        assert_eq!(
            local_status(&decide(&snap, &conn(), &two, &mut r)),
            Some((400, Flags::DownstreamProtocolError))
        );
        // HTTP/1.0 may leave Host out (and then matches no virtual host).
        let old = head(http::Request::get("/canary").version(Version::HTTP_10));
        assert_eq!(
            local_status(&decide(&snap, &conn(), &old, &mut r)),
            Some((404, Flags::NoRoute))
        );
    }

    #[test]
    fn a_request_on_an_unknown_listener_is_not_routed() {
        let snap = snapshot();
        let other = ConnContext::new(
            "10.1.2.3:5555".parse().expect("addr"),
            "127.0.0.1:1".parse().expect("addr"),
        );
        let d = decide(&snap, &other, &get("/canary", "shop.example"), &mut rng());
        assert_eq!(local_status(&d), Some((404, Flags::NoRoute)));
    }

    /// Duplicate endpoints (one address under two names, as DNS can give)
    /// are kept once, and locality priorities index the endpoints kept.
    #[test]
    fn duplicate_endpoints_with_localities_stay_in_bounds() {
        let (mut c, mut a) = cluster("dup", 9001);
        c.locality_lb = Some(pb::LocalityLb::default());
        c.outlier_detection = Some(pb::OutlierDetection {
            max_ejection_percent: 100,
            ..Default::default()
        });
        let ep = |locality: &str| pb::Endpoint {
            address: "127.0.0.1".into(),
            port: 9001,
            locality: locality.into(),
            ..Default::default()
        };
        a.endpoints = vec![ep("r/z/a"), ep("r/z/b"), ep("r/y/a")];
        let id = ProxyIdentity {
            locality: "r/y/a".into(),
            ..Default::default()
        };
        let cfg = pb::ProxyConfig {
            clusters: vec![c],
            load_assignments: vec![a],
            ..Default::default()
        };
        let snap = build(cfg, &id).expect("valid");
        let cl = &snap.clusters["dup"];
        assert_eq!(cl.endpoints.len(), 1);
        for level in &cl.priorities {
            for g in level {
                assert!(g.members.iter().all(|m| (*m as usize) < cl.endpoints.len()));
            }
        }
        assert_eq!(cl.pick(None, &[]), Some(0));
    }
}
