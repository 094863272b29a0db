//! The proxy's immutable configuration snapshot, built from
//! `bosun.config.v1` with `TryFrom`. Everything a request needs is resolved
//! here once: clusters are linked into routes as `Arc`s, header names are
//! parsed, regexes compiled, hash rings built. A snapshot that cannot be
//! built is rejected whole (the proxy keeps the previous one).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bosun_xds_proto::config as pb;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use crate::cluster::{
    CircuitLimits, Cluster, Endpoint, EndpointRegistry, HashKey, Lb, UpstreamProtocol,
};
use crate::connect::Transport;
use crate::error::{RejectError, reject};
use crate::identity::ProxyIdentity;
use crate::locality;
use crate::metrics::{LabelSet, ServiceLabels, WorkloadLabels};
use crate::outlier::OutlierConfig;
use crate::policy::RoutePolicy;
use crate::pool::{Keepalive, PoolKey, PoolOptions, Pools};
use crate::route::{
    Action, HeaderMatch, HeaderOps, Redirect, Route, RouteAction, RouteMatch, RouteTable, StrMatch,
    VirtualHost, WeightedClusters,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
    Gateway,
}

#[derive(Debug)]
pub enum ListenerKind {
    Http { route_table: Arc<RouteTable> },
    Tcp { route: Option<WeightedClusters> },
}

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub addr: SocketAddr,
    pub direction: Direction,
    pub kind: ListenerKind,
    /// Inbound mutual TLS (PeerAuthentication).
    pub peer_mtls: PeerMtls,
    /// Gateway TLS servers, by SNI.
    pub tls: Option<Arc<crate::tls::server::TlsListener>>,
    /// Sidecar with transparent capture: routes by original destination.
    pub capture: Option<Arc<crate::capture::CaptureTable>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMtls {
    Disable,
    Permissive,
    Strict,
}

/// One complete, immutable configuration. Swapped whole with `ArcSwap`.
#[derive(Debug)]
pub struct Snapshot {
    pub version: String,
    /// By the address the listener binds.
    pub listeners: crate::fxhash::FxMap<SocketAddr, Arc<Listener>>,
    pub clusters: HashMap<String, Arc<Cluster>>,
    /// What was applied, for `/config_dump`.
    pub source: pb::ProxyConfig,
    /// Metric labels of requests no route took (outbound, inbound).
    no_route: [Arc<LabelSet>; 2],
}

impl Snapshot {
    pub fn empty(identity: &ProxyIdentity) -> Self {
        Snapshot {
            version: String::new(),
            listeners: Default::default(),
            clusters: HashMap::new(),
            source: pb::ProxyConfig::default(),
            no_route: no_route_labels(identity),
        }
    }

    pub fn no_route_labels(&self, inbound: bool) -> Arc<LabelSet> {
        self.no_route[usize::from(inbound)].clone()
    }
}

fn no_route_labels(identity: &ProxyIdentity) -> [Arc<LabelSet>; 2] {
    [
        Arc::new(LabelSet::no_route(identity, false)),
        Arc::new(LabelSet::no_route(identity, true)),
    ]
}

/// Everything besides the resources that building a snapshot needs.
pub struct BuildContext<'a> {
    pub identity: &'a ProxyIdentity,
    pub endpoints: &'a EndpointRegistry,
    pub pools: &'a Pools,
    /// Addresses of DNS endpoints, as last resolved.
    pub dns: Option<&'a crate::dns::DnsCache>,
    /// The workload certificate, for mesh TLS to upstreams.
    pub tls: &'a Arc<crate::tls::Store>,
}

impl Snapshot {
    pub fn build(cfg: pb::ProxyConfig, ctx: &BuildContext<'_>) -> Result<Snapshot, RejectError> {
        let mut assignments: HashMap<&str, &pb::ClusterLoadAssignment> = HashMap::new();
        for a in &cfg.load_assignments {
            assignments.insert(a.cluster.as_str(), a);
        }
        let mut clusters = HashMap::new();
        for c in &cfg.clusters {
            let cla = assignments.get(c.name.as_str()).copied();
            let cluster = build_cluster(c, cla, ctx)?;
            if clusters.insert(c.name.clone(), Arc::new(cluster)).is_some() {
                return Err(reject(
                    format!("Cluster/{}", c.name),
                    "name",
                    "duplicate cluster",
                ));
            }
        }
        let mut tables = HashMap::new();
        for rc in &cfg.route_configurations {
            let t = build_route_table(rc, &clusters)?;
            tables.insert(rc.name.clone(), Arc::new(t));
        }
        let mut listeners = crate::fxhash::FxMap::default();
        for l in &cfg.listeners {
            let id = format!("Listener/{}", l.name);
            let ip: IpAddr = l.address.parse().map_err(|_| {
                reject(
                    &id,
                    "address",
                    format!("{:?} is not an IP address", l.address),
                )
            })?;
            let port = u16::try_from(l.port).map_err(|_| reject(&id, "port", "out of range"))?;
            let direction = match pb::TrafficDirection::try_from(l.direction) {
                Ok(pb::TrafficDirection::Inbound) => Direction::Inbound,
                Ok(pb::TrafficDirection::Gateway) => Direction::Gateway,
                _ => Direction::Outbound,
            };
            let kind = match pb::ListenerProtocol::try_from(l.protocol) {
                Ok(pb::ListenerProtocol::Http) => ListenerKind::Http {
                    route_table: tables.get(&l.route_configuration).cloned().ok_or_else(|| {
                        reject(
                            &id,
                            "route_configuration",
                            format!("unknown {:?}", l.route_configuration),
                        )
                    })?,
                },
                Ok(pb::ListenerProtocol::Tcp) => ListenerKind::Tcp {
                    route: match l.tcp_routes.first() {
                        Some(r) => Some(weighted(&r.clusters, &clusters, &id, "tcp_routes[0]")?),
                        None => None,
                    },
                },
                _ => return Err(reject(&id, "protocol", "must be HTTP or TCP")),
            };
            let peer_mtls = match pb::PeerMtls::try_from(l.peer_mtls) {
                Ok(pb::PeerMtls::Disable) => PeerMtls::Disable,
                Ok(pb::PeerMtls::Permissive) => PeerMtls::Permissive,
                Ok(pb::PeerMtls::Strict) => PeerMtls::Strict,
                Err(_) => return Err(reject(&id, "peer_mtls", "unknown mode")),
            };
            if peer_mtls != PeerMtls::Disable && !matches!(kind, ListenerKind::Http { .. }) {
                return Err(reject(
                    &id,
                    "peer_mtls",
                    "mutual TLS is supported on HTTP listeners only",
                ));
            }
            let tls = if l.tls_servers.is_empty() {
                None
            } else {
                let http = matches!(kind, ListenerKind::Http { .. });
                let mut servers = Vec::new();
                for (i, ts) in l.tls_servers.iter().enumerate() {
                    let field = format!("tls_servers[{i}]");
                    let kind = if ts.mode == pb::TlsServerMode::Passthrough as i32 {
                        crate::tls::server::ServerKind::Passthrough(weighted(
                            &ts.passthrough,
                            &clusters,
                            &id,
                            &format!("{field}.passthrough"),
                        )?)
                    } else {
                        crate::tls::server::ServerKind::Terminate(
                            crate::tls::server::server_config(ts, ctx.tls, http)
                                .map_err(|e| reject(&id, &field, e))?,
                        )
                    };
                    servers.push(crate::tls::server::ServerEntry {
                        names: ts.server_names.clone(),
                        kind,
                    });
                }
                Some(Arc::new(crate::tls::server::TlsListener { servers }))
            };
            let capture = match &l.capture {
                Some(c) => {
                    if !matches!(kind, ListenerKind::Http { .. }) || tls.is_some() {
                        return Err(reject(
                            &id,
                            "capture",
                            "a capture listener is an HTTP listener without TLS servers",
                        ));
                    }
                    Some(Arc::new(crate::capture::CaptureTable::build(
                        c, &clusters, &id,
                    )?))
                }
                None => None,
            };
            let listener = Listener {
                name: l.name.clone(),
                addr: SocketAddr::new(ip, port),
                direction,
                kind,
                peer_mtls,
                tls,
                capture,
            };
            if let Some(other) = listeners.insert(listener.addr, Arc::new(listener)) {
                return Err(reject(
                    &id,
                    "port",
                    format!(
                        "{}:{} is also used by listener {}",
                        l.address, l.port, other.name
                    ),
                ));
            }
        }
        Ok(Snapshot {
            version: cfg.version.clone(),
            listeners,
            clusters,
            source: cfg,
            no_route: no_route_labels(ctx.identity),
        })
    }
}

fn build_cluster(
    c: &pb::Cluster,
    cla: Option<&pb::ClusterLoadAssignment>,
    ctx: &BuildContext<'_>,
) -> Result<Cluster, RejectError> {
    let id = format!("Cluster/{}", c.name);
    let protocol = match pb::UpstreamProtocol::try_from(c.protocol) {
        Ok(pb::UpstreamProtocol::Http1) => UpstreamProtocol::Http1,
        Ok(pb::UpstreamProtocol::Http2) => UpstreamProtocol::Http2,
        Ok(pb::UpstreamProtocol::Tcp) => UpstreamProtocol::Tcp,
        Ok(pb::UpstreamProtocol::Unspecified) => UpstreamProtocol::Downstream,
        Err(_) => return Err(reject(&id, "protocol", "unknown upstream protocol")),
    };
    let inbound = c.name.starts_with("inbound|");
    let cp = c.connection_pool.unwrap_or_default();
    let ms = |v: u64| (v > 0).then(|| std::time::Duration::from_millis(v));
    let defaults = ctx.pools.defaults();
    let pool_opts = PoolOptions {
        connect_timeout: ms(cp.connect_timeout_ms).unwrap_or(defaults.connect_timeout),
        idle_timeout: ms(cp.idle_timeout_ms).unwrap_or(defaults.idle_timeout),
        max_requests: cp.max_requests_per_connection,
        max_age: ms(cp.max_connection_duration_ms),
        keepalive: cp.tcp_keepalive.as_ref().map(|k| Keepalive {
            time: std::time::Duration::from_millis(k.time_ms),
            interval: std::time::Duration::from_millis(k.interval_ms),
            probes: k.probes,
        }),
    };
    if cp.max_concurrent_streams > 0 {
        return Err(reject(
            &id,
            "connection_pool.max_concurrent_streams",
            "not supported by this proxy yet",
        ));
    }
    let dns = pb::DnsLookup::try_from(c.dns)
        .map_err(|_| reject(&id, "dns", "unknown DNS lookup mode"))?;
    let assigned = cla.map(|a| a.endpoints.as_slice()).unwrap_or(&[]);
    // DNS clusters: each named endpoint becomes the addresses it resolved
    // to (all of them, or the first for LOGICAL), from the proxy's cache.
    let mut resolved: Vec<(IpAddr, &pb::Endpoint)> = Vec::new();
    for (i, e) in assigned.iter().enumerate() {
        match e.address.parse::<IpAddr>() {
            Ok(ip) => resolved.push((ip, e)),
            Err(_) if dns != pb::DnsLookup::None => {
                let ips = ctx.dns.map(|d| d.addresses(&e.address)).unwrap_or_default();
                let take = if dns == pb::DnsLookup::Logical {
                    1
                } else {
                    ips.len()
                };
                resolved.extend(ips.into_iter().take(take).map(|ip| (ip, e)));
            }
            Err(_) => {
                return Err(reject(
                    &id,
                    format!("endpoints[{i}]"),
                    format!("address {:?} is not an IP address", e.address),
                ));
            }
        }
    }
    // TLS: a DestinationRule's for every endpoint; without one, auto mTLS
    // (Istio mutual TLS to endpoints labelled tlsMode=istio).
    let tls_err = |e: String| reject(&id, "tls", e);
    let cluster_tls = match &c.tls {
        Some(t) => Some(
            crate::tls::origin::from_config(t, ctx.tls, &c.name, &c.service_host, &c.identities)
                .map_err(tls_err)?
                .map(|o| Transport::Tls(Arc::new(o)))
                .unwrap_or(Transport::Plaintext),
        ),
        None => None,
    };
    let auto_mtls = if c.tls.is_none() && assigned.iter().any(|e| e.istio_mtls) {
        let o = crate::tls::origin::mesh(ctx.tls, &c.name, "", &c.identities).map_err(tls_err)?;
        Some(Transport::Tls(Arc::new(o)))
    } else {
        None
    };
    let original_dst = if c.original_dst || c.original_dst_loopback {
        if !assigned.is_empty() {
            return Err(reject(
                &id,
                "original_dst",
                "an ORIGINAL_DST cluster lists no endpoints",
            ));
        }
        let mut source = c.clone();
        source.original_dst = false;
        source.original_dst_loopback = false;
        Some(Box::new(crate::cluster::OriginalDst {
            source,
            loopback: c.original_dst_loopback,
            built: Default::default(),
        }))
    } else {
        None
    };
    let mut endpoints = Vec::new();
    // The config endpoint behind each endpoint kept (duplicates dropped):
    // localities are read from these, index for index.
    let mut kept: Vec<&pb::Endpoint> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, (ip, e)) in resolved.iter().enumerate() {
        let field = format!("endpoints[{i}]");
        let port = u16::try_from(e.port).map_err(|_| reject(&id, &field, "port out of range"))?;
        let addr = SocketAddr::new(*ip, port);
        if !seen.insert(addr) {
            continue;
        }
        kept.push(e);
        let workload = WorkloadLabels {
            workload: &e.workload,
            namespace: &e.namespace,
            app: e.labels.get("app").map(String::as_str).unwrap_or(""),
            version: e.labels.get("version").map(String::as_str).unwrap_or(""),
        };
        let mut labels =
            LabelSet::destination(ctx.identity, &service_labels(c), &workload, inbound);
        let transport = match (&cluster_tls, &auto_mtls) {
            (Some(t), _) => t.clone(),
            (None, Some(t)) if e.istio_mtls => t.clone(),
            _ => Transport::Plaintext,
        };
        if let Transport::Tls(o) = &transport
            && o.is_mesh()
        {
            let peer = match o.key.sans.as_slice() {
                [one] => one.as_str(),
                _ => "",
            };
            labels.mesh_peer = Some(Arc::from(peer));
        }
        let pool = ctx.pools.get(PoolKey {
            addr,
            transport,
            opts: pool_opts,
        });
        endpoints.push(Arc::new(Endpoint::new(
            addr,
            ctx.endpoints.stats(&c.name, addr),
            pool,
            labels,
        )?));
    }
    let priorities = match &c.locality_lb {
        Some(l) => locality::priorities(
            l,
            &ctx.identity.locality,
            &ctx.identity.labels,
            kept.iter().map(|e| (e.locality.as_str(), &e.labels)),
        ),
        None => Vec::new(),
    };
    let hash = match c.hash_policy.as_ref().and_then(|h| h.key.as_ref()) {
        None => None,
        Some(pb::hash_policy::Key::HeaderName(h)) => Some(HashKey::Header(
            HeaderName::try_from(h.as_str())
                .map_err(|_| reject(&id, "hash_policy.header_name", "invalid header name"))?,
        )),
        Some(pb::hash_policy::Key::Cookie(ck)) => Some(HashKey::Cookie {
            name: ck.name.clone(),
            path: ck.path.clone(),
            ttl_seconds: ck.ttl_seconds,
        }),
        Some(pb::hash_policy::Key::SourceIp(_)) => Some(HashKey::SourceIp),
        Some(pb::hash_policy::Key::QueryParameter(q)) => Some(HashKey::Query(q.clone())),
    };
    let lb = match pb::LbPolicy::try_from(c.lb_policy) {
        Ok(pb::LbPolicy::RoundRobin | pb::LbPolicy::Unspecified) => Lb::round_robin(),
        Ok(pb::LbPolicy::LeastRequest) => Lb::LeastRequest,
        Ok(pb::LbPolicy::Random) => Lb::Random,
        Ok(pb::LbPolicy::RingHash) => Lb::ring_hash(&endpoints, c.table_size),
        Ok(pb::LbPolicy::Maglev) => {
            Lb::maglev(&endpoints, c.table_size).map_err(|m| reject(&id, "table_size", m))?
        }
        Err(_) => return Err(reject(&id, "lb_policy", "unknown policy")),
    };
    if lb.is_hash() && hash.is_none() {
        return Err(reject(
            &id,
            "hash_policy",
            "ring hash and maglev need a hash policy",
        ));
    }
    Ok(Cluster {
        name: c.name.clone(),
        protocol,
        lb,
        hash,
        endpoints,
        no_endpoint_labels: LabelSet::destination_service_only(
            ctx.identity,
            &service_labels(c),
            inbound,
        ),
        conn_slots: (cp.max_connections > 0).then(|| {
            ctx.endpoints
                .cluster(&c.name)
                .conn_slots(cp.max_connections)
        }),
        state: ctx.endpoints.cluster(&c.name),
        limits: CircuitLimits {
            max_connections: cp.max_connections,
            max_pending: cp.max_pending_requests,
            max_requests: cp.max_requests,
            max_retries: cp.max_retries,
        },
        outlier: c.outlier_detection.as_ref().map(OutlierConfig::from),
        priorities,
        original_dst,
    })
}

/// The cluster an ORIGINAL_DST cluster uses for one destination: its
/// config with that one endpoint, built as any other cluster (TLS origin,
/// pools, labels), and kept for this snapshot's life (at most
/// `MAX_ORIGINAL_DST` destinations; then the set starts over).
pub fn original_dst_cluster(
    od: &crate::cluster::OriginalDst,
    dst: SocketAddr,
    ctx: &BuildContext<'_>,
) -> Result<Arc<Cluster>, RejectError> {
    let dst = if od.loopback {
        let ip: IpAddr = if dst.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        SocketAddr::new(ip, dst.port())
    } else {
        dst
    };
    let mut built = od.built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = built.get(&dst) {
        return Ok(c.clone());
    }
    let cla = pb::ClusterLoadAssignment {
        cluster: od.source.name.clone(),
        endpoints: vec![pb::Endpoint {
            address: dst.ip().to_string(),
            port: u32::from(dst.port()),
            ..Default::default()
        }],
    };
    let c = Arc::new(build_cluster(&od.source, Some(&cla), ctx)?);
    if built.len() >= MAX_ORIGINAL_DST {
        built.clear();
    }
    built.insert(dst, c.clone());
    Ok(c)
}

/// Destinations an ORIGINAL_DST cluster keeps clusters (and pools) for.
const MAX_ORIGINAL_DST: usize = 4096;

fn service_labels(c: &pb::Cluster) -> ServiceLabels<'_> {
    ServiceLabels {
        cluster: &c.name,
        host: &c.service_host,
        name: &c.service_name,
        namespace: &c.service_namespace,
    }
}

pub(crate) fn weighted(
    wcs: &[pb::WeightedCluster],
    clusters: &HashMap<String, Arc<Cluster>>,
    id: &str,
    field: &str,
) -> Result<WeightedClusters, RejectError> {
    let mut out = Vec::new();
    let mut total = 0u32;
    for (i, w) in wcs.iter().enumerate() {
        let c = clusters.get(&w.cluster).ok_or_else(|| {
            reject(
                id,
                format!("{field}.clusters[{i}]"),
                format!("unknown cluster {:?}", w.cluster),
            )
        })?;
        total = total.saturating_add(w.weight);
        out.push((c.clone(), w.weight));
    }
    if out.is_empty() {
        return Err(reject(id, field, "no clusters"));
    }
    if total == 0 {
        return Err(reject(id, field, "weights sum to 0"));
    }
    Ok(WeightedClusters {
        clusters: out,
        total,
    })
}

fn str_match(
    m: &pb::StringMatch,
    ignore_case: bool,
    id: &str,
    field: &str,
) -> Result<Option<StrMatch>, RejectError> {
    use pb::string_match::Kind;
    Ok(match &m.kind {
        None => None,
        Some(Kind::Exact(e)) if ignore_case => Some(StrMatch::Exact(e.to_ascii_lowercase())),
        Some(Kind::Prefix(p)) if ignore_case => Some(StrMatch::Prefix(p.to_ascii_lowercase())),
        Some(Kind::Exact(e)) => Some(StrMatch::Exact(e.clone())),
        Some(Kind::Prefix(p)) => Some(StrMatch::Prefix(p.clone())),
        Some(Kind::Regex(r)) => {
            let pattern = if ignore_case {
                format!("(?i)^(?:{r})$")
            } else {
                format!("^(?:{r})$")
            };
            Some(StrMatch::Regex(regex::Regex::new(&pattern).map_err(
                |e| reject(id, field, format!("invalid regex: {e}")),
            )?))
        }
    })
}

fn header_ops(
    o: Option<&pb::HeaderOperations>,
    id: &str,
    field: &str,
) -> Result<HeaderOps, RejectError> {
    let Some(o) = o else {
        return Ok(HeaderOps::default());
    };
    let name = |n: &str| {
        HeaderName::try_from(n).map_err(|_| reject(id, field, format!("invalid header name {n:?}")))
    };
    let value = |v: &str| {
        HeaderValue::try_from(v)
            .map_err(|_| reject(id, field, format!("invalid header value {v:?}")))
    };
    let mut ops = HeaderOps::default();
    for (k, v) in &o.set {
        ops.set.push((name(k)?, value(v)?));
    }
    for (k, v) in &o.add {
        ops.add.push((name(k)?, value(v)?));
    }
    for k in &o.remove {
        ops.remove.push(name(k)?);
    }
    Ok(ops)
}

fn build_route_table(
    rc: &pb::RouteConfiguration,
    clusters: &HashMap<String, Arc<Cluster>>,
) -> Result<RouteTable, RejectError> {
    let mut vhosts = Vec::new();
    for vh in &rc.virtual_hosts {
        let id = format!("RouteConfiguration/{}/{}", rc.name, vh.name);
        let mut routes = Vec::new();
        for (ri, r) in vh.routes.iter().enumerate() {
            let field = format!("routes[{ri}]");
            let mut matches = Vec::new();
            for (mi, m) in r.matches.iter().enumerate() {
                let f = format!("{field}.matches[{mi}]");
                let sm = |o: &Option<pb::StringMatch>,
                          ic: bool,
                          n: &str|
                 -> Result<Option<StrMatch>, RejectError> {
                    match o {
                        Some(m) => str_match(m, ic, &id, &format!("{f}.{n}")),
                        None => Ok(None),
                    }
                };
                let hm =
                    |list: &[pb::HeaderMatch], n: &str| -> Result<Vec<HeaderMatch>, RejectError> {
                        list.iter()
                            .map(|h| {
                                Ok(HeaderMatch {
                                    name: h.name.clone(),
                                    header: HeaderName::try_from(h.name.as_str()).ok(),
                                    value: match &h.value {
                                        Some(v) => str_match(v, false, &id, &format!("{f}.{n}"))?,
                                        None => None,
                                    },
                                })
                            })
                            .collect()
                    };
                matches.push(RouteMatch {
                    uri: sm(&m.uri, m.ignore_uri_case, "uri")?,
                    ignore_uri_case: m.ignore_uri_case,
                    authority: sm(&m.authority, false, "authority")?,
                    method: sm(&m.method, false, "method")?,
                    scheme: sm(&m.scheme, false, "scheme")?,
                    headers: hm(&m.headers, "headers")?,
                    without_headers: hm(&m.without_headers, "without_headers")?,
                    query_params: hm(&m.query_params, "query_params")?,
                    port: u16::try_from(m.port)
                        .map_err(|_| reject(&id, &f, "port out of range"))?,
                });
            }
            let action = match &r.action {
                Some(pb::route::Action::Route(ra)) => Action::Route(RouteAction {
                    policy: Box::new(RoutePolicy::build(
                        r,
                        &format!("{id}.{field}"),
                        &|name| {
                            clusters.get(name).cloned().ok_or_else(|| {
                                reject(
                                    &id,
                                    format!("{field}.mirrors"),
                                    format!("unknown cluster {name:?}"),
                                )
                            })
                        },
                        &|m| {
                            str_match(m, false, &id, &format!("{field}.cors.allow_origins"))?
                                .ok_or_else(|| {
                                    reject(
                                        &id,
                                        format!("{field}.cors.allow_origins"),
                                        "empty match",
                                    )
                                })
                        },
                    )?),
                    clusters: weighted(&ra.clusters, clusters, &id, &field)?,
                    uri_rewrite: (!ra.uri_rewrite.is_empty()).then(|| ra.uri_rewrite.clone()),
                    authority_rewrite: if ra.authority_rewrite.is_empty() {
                        None
                    } else {
                        Some(
                            HeaderValue::try_from(ra.authority_rewrite.as_str()).map_err(|_| {
                                reject(
                                    &id,
                                    format!("{field}.authority_rewrite"),
                                    "invalid authority",
                                )
                            })?,
                        )
                    },
                }),
                Some(pb::route::Action::Redirect(rd)) => Action::Redirect(Redirect {
                    uri: (!rd.uri.is_empty()).then(|| rd.uri.clone()),
                    authority: (!rd.authority.is_empty()).then(|| rd.authority.clone()),
                    scheme: (!rd.scheme.is_empty()).then(|| rd.scheme.clone()),
                    port: u16::try_from(rd.port).ok().filter(|p| *p != 0),
                    status: StatusCode::from_u16(rd.status as u16).map_err(|_| {
                        reject(&id, format!("{field}.redirect.status"), "invalid status")
                    })?,
                }),
                Some(pb::route::Action::DirectResponse(d)) => Action::Direct {
                    status: u16::try_from(d.status)
                        .ok()
                        .and_then(|s| StatusCode::from_u16(s).ok())
                        .ok_or_else(|| {
                            reject(
                                &id,
                                format!("{field}.direct_response.status"),
                                "invalid status",
                            )
                        })?,
                    body: Bytes::from(d.body.clone()),
                },
                None => return Err(reject(&id, &field, "route has no action")),
            };
            if !matches!(action, Action::Route(_))
                && (r.timeout_ms > 0
                    || r.retry_policy.is_some()
                    || r.fault.is_some()
                    || !r.mirrors.is_empty()
                    || r.cors.is_some())
            {
                return Err(reject(
                    &id,
                    &field,
                    "timeout, retries, fault, mirrors and CORS apply only to routes to clusters",
                ));
            }
            routes.push(Route {
                name: Arc::from(r.name.as_str()),
                matches,
                action,
                request_ops: header_ops(
                    r.request_headers.as_ref(),
                    &id,
                    &format!("{field}.request_headers"),
                )?,
                response_ops: header_ops(
                    r.response_headers.as_ref(),
                    &id,
                    &format!("{field}.response_headers"),
                )?,
            });
        }
        vhosts.push(VirtualHost {
            name: vh.name.clone(),
            domains: vh.domains.clone(),
            routes,
        });
    }
    Ok(RouteTable::new(rc.name.clone(), vhosts))
}
