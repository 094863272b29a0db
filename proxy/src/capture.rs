//! Transparent capture: a connection `bosun capture` redirected to the
//! sidecar is routed by where its client sent it (`SO_ORIGINAL_DST`).
//!
//! Outbound (15001): the original destination picks a target: a
//! Service's ClusterIP and port or an endpoint's address and port
//! (exact), else any address on an HTTP port (routed by Host, as Istio's
//! `0.0.0.0:<port>` listeners). Its protocol is declared or sniffed from
//! the first bytes: a TLS ClientHello (routed by SNI), an HTTP/1.1
//! request line or the h2 preface (routed by Host), else opaque TCP. What
//! matches nothing follows `outboundTrafficPolicy`: ALLOW_ANY goes to the
//! original destination (PassthroughCluster), REGISTRY_ONLY is refused
//! (BlackHoleCluster; HTTP gets the control's 502 virtual host).
//!
//! Inbound (15006): mutual TLS or plaintext as PeerAuthentication says,
//! then to the app on this host at the port the client dialled: HTTP, or
//! TCP for TCP ports, an mTLS peer that negotiated `istio` (Istio's ALPN
//! for TCP), or plaintext that is not HTTP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bosun_xds_proto::config as pb;
use tokio::net::TcpStream;

use crate::Shared;
use crate::cluster::Cluster;
use crate::config::{Listener, weighted};
use crate::drain::Tracked;
use crate::error::{RejectError, reject};
use crate::route::WeightedClusters;

/// Ports of the sidecar itself (Istio's): admin, outbound, inbound,
/// status, metrics. Never forwarded to the app.
pub const PROXY_PORTS: [u16; 7] = [15000, 15001, 15004, 15006, 15020, 15021, 15090];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Sniff,
    Http,
    Tcp,
    Tls,
}

#[derive(Debug)]
pub struct Target {
    pub protocol: Protocol,
    pub tcp: Option<WeightedClusters>,
    /// TLS: by SNI (exact, `*.suffix`, `*`), first match.
    pub sni: Vec<(Vec<String>, WeightedClusters)>,
    /// To an endpoint's own address: only that endpoint.
    pub pin: bool,
    /// Inbound: this port's PeerAuthentication mode, over the listener's.
    pub peer_mtls: Option<crate::config::PeerMtls>,
}

#[derive(Debug)]
pub struct CaptureTable {
    exact: HashMap<SocketAddr, Target>,
    any_addr: HashMap<u16, Target>,
    /// ALLOW_ANY: an ORIGINAL_DST cluster; None: REGISTRY_ONLY.
    pub passthrough: Option<Arc<Cluster>>,
    /// None: wait for the first bytes as long as a request head may take.
    pub sniff_timeout: Option<Duration>,
    pub inbound: bool,
}

impl CaptureTable {
    pub fn build(
        c: &pb::Capture,
        clusters: &HashMap<String, Arc<Cluster>>,
        id: &str,
    ) -> Result<CaptureTable, RejectError> {
        let mut exact = HashMap::new();
        let mut any_addr = HashMap::new();
        for (i, t) in c.targets.iter().enumerate() {
            let f = format!("capture.targets[{i}]");
            let port = u16::try_from(t.port)
                .map_err(|_| reject(id, format!("{f}.port"), "out of range"))?;
            let protocol = match pb::CaptureProtocol::try_from(t.protocol) {
                Ok(pb::CaptureProtocol::Sniff) => Protocol::Sniff,
                Ok(pb::CaptureProtocol::Http) => Protocol::Http,
                Ok(pb::CaptureProtocol::Tcp) => Protocol::Tcp,
                Ok(pb::CaptureProtocol::Tls) => Protocol::Tls,
                Err(_) => return Err(reject(id, format!("{f}.protocol"), "unknown protocol")),
            };
            let tcp = match t.tcp_routes.first() {
                Some(r) => Some(weighted(
                    &r.clusters,
                    clusters,
                    id,
                    &format!("{f}.tcp_routes[0]"),
                )?),
                None => None,
            };
            let mut sni = Vec::new();
            for (j, r) in t.sni_routes.iter().enumerate() {
                let names = r
                    .server_names
                    .iter()
                    .map(|n| n.to_ascii_lowercase())
                    .collect();
                sni.push((
                    names,
                    weighted(&r.clusters, clusters, id, &format!("{f}.sni_routes[{j}]"))?,
                ));
            }
            let peer_mtls = match t.peer_mtls.map(pb::PeerMtls::try_from) {
                None => None,
                Some(Ok(pb::PeerMtls::Disable)) => Some(crate::config::PeerMtls::Disable),
                Some(Ok(pb::PeerMtls::Permissive)) => Some(crate::config::PeerMtls::Permissive),
                Some(Ok(pb::PeerMtls::Strict)) => Some(crate::config::PeerMtls::Strict),
                Some(Err(_)) => return Err(reject(id, format!("{f}.peer_mtls"), "unknown mode")),
            };
            let target = Target {
                protocol,
                tcp,
                sni,
                pin: t.pin_endpoint,
                peer_mtls,
            };
            let clash = if t.address.is_empty() {
                any_addr.insert(port, target).is_some()
            } else {
                let ip: IpAddr = t.address.parse().map_err(|_| {
                    reject(
                        id,
                        format!("{f}.address"),
                        format!("{:?} is not an IP address", t.address),
                    )
                })?;
                exact.insert(SocketAddr::new(ip, port), target).is_some()
            };
            if clash {
                return Err(reject(
                    id,
                    f,
                    format!("{}:{} has two targets", t.address, t.port),
                ));
            }
        }
        let passthrough = if c.passthrough_cluster.is_empty() {
            None
        } else {
            let pc = clusters.get(&c.passthrough_cluster).ok_or_else(|| {
                reject(
                    id,
                    "capture.passthrough_cluster",
                    format!("unknown cluster {:?}", c.passthrough_cluster),
                )
            })?;
            if pc.original_dst.is_none() {
                return Err(reject(
                    id,
                    "capture.passthrough_cluster",
                    "must be an ORIGINAL_DST cluster",
                ));
            }
            Some(pc.clone())
        };
        Ok(CaptureTable {
            exact,
            any_addr,
            passthrough,
            sniff_timeout: (c.sniff_timeout_ms > 0)
                .then(|| Duration::from_millis(c.sniff_timeout_ms)),
            inbound: c.inbound,
        })
    }

    /// The target for `dst`: its exact address, else any address on its port.
    pub fn target(&self, dst: SocketAddr) -> Option<&Target> {
        self.exact
            .get(&dst)
            .or_else(|| self.any_addr.get(&dst.port()))
    }
}

/// What the first bytes of a connection say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Tls,
    Http,
    Other,
    /// The client closed, or failed, before saying.
    Gone,
}

/// Reads (peeks: nothing is consumed) the first bytes of `s` until they
/// tell TLS (a handshake record), HTTP (a method token and a space, which
/// the h2 preface `PRI * HTTP/2.0` is too) or something else; a client
/// silent until `deadline` is something else (server-first protocols).
pub async fn sniff(s: &TcpStream, deadline: tokio::time::Instant) -> Sniffed {
    let mut buf = [0u8; 24];
    let mut last = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, s.peek(&mut buf)).await {
            Err(_) => return Sniffed::Other,
            Ok(Err(_)) | Ok(Ok(0)) => return Sniffed::Gone,
            Ok(Ok(n)) => n,
        };
        if let Some(v) = classify(&buf[..n], n == buf.len()) {
            return v;
        }
        if n == last && tokio::time::Instant::now() >= deadline {
            return Sniffed::Other;
        }
        last = n;
        // More bytes are needed: a peek returns at once while any are
        // queued, so look again shortly.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `None`: not enough bytes to tell.
fn classify(b: &[u8], full: bool) -> Option<Sniffed> {
    let first = *b.first()?;
    if first == 0x16 {
        return Some(Sniffed::Tls);
    }
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'A'..=b'Z' | b'-' | b'_' => {}
            b' ' if i > 0 => return Some(Sniffed::Http),
            _ => return Some(Sniffed::Other),
        }
    }
    if full { Some(Sniffed::Other) } else { None }
}

fn sniff_deadline(shared: &Shared, table: &CaptureTable) -> tokio::time::Instant {
    tokio::time::Instant::now()
        + table
            .sniff_timeout
            .unwrap_or(shared.limits.request_head_timeout)
}

/// Serves a connection the outbound capture listener took, sent to `dst`.
pub async fn serve_outbound(
    shared: Arc<Shared>,
    table: Arc<CaptureTable>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    dst: SocketAddr,
    tracked: Tracked,
) {
    let target = table.target(dst);
    let declared = target.map_or(Protocol::Sniff, |t| t.protocol);
    let kind = match declared {
        Protocol::Http => Sniffed::Http,
        Protocol::Tcp => Sniffed::Other,
        Protocol::Tls => Sniffed::Tls,
        Protocol::Sniff => sniff(&stream, sniff_deadline(&shared, &table)).await,
    };
    match kind {
        Sniffed::Gone => {}
        Sniffed::Http => {
            crate::http::serve_connection(shared, stream, peer, local, Some(dst), tracked).await
        }
        Sniffed::Tls => {
            let deadline = tokio::time::Instant::now() + shared.limits.request_head_timeout;
            let sni = match crate::tls::server::peek_hello(&stream, deadline).await {
                Some(h) => h.sni.map(|s| s.to_ascii_lowercase()),
                None => None,
            };
            let route = target.and_then(|t| {
                sni.as_deref()
                    .and_then(|sni| {
                        t.sni
                            .iter()
                            .find(|(names, _)| names.iter().any(|n| sni_matches(n, sni)))
                            .map(|(_, r)| r)
                    })
                    .or(t.tcp.as_ref())
            });
            let pin = target.is_some_and(|t| t.pin);
            tcp(shared, &table, route, pin, stream, peer, dst).await
        }
        Sniffed::Other => {
            let route = target.and_then(|t| t.tcp.as_ref());
            let pin = target.is_some_and(|t| t.pin);
            tcp(shared, &table, route, pin, stream, peer, dst).await
        }
    }
}

/// `*` any, `*.suffix` a name under it, else the exact name.
fn sni_matches(pattern: &str, sni: &str) -> bool {
    let sni = sni.trim_end_matches('.');
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => sni.len() > suffix.len() && sni.ends_with(suffix),
        None => pattern == sni,
    }
}

/// Opaque TCP by `route`, else to the original destination (ALLOW_ANY),
/// else refused (REGISTRY_ONLY: the connection is closed).
async fn tcp(
    shared: Arc<Shared>,
    table: &CaptureTable,
    route: Option<&WeightedClusters>,
    pin: bool,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
) {
    let cluster = match route {
        Some(r) => r.pick_with(&mut rand::rng()),
        None => match &table.passthrough {
            Some(p) => p,
            None => {
                shared
                    .metrics
                    .blackholed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(%peer, %dst, "REGISTRY_ONLY: unknown destination refused");
                return;
            }
        },
    };
    // A route's cluster may be ORIGINAL_DST too (resolution NONE).
    let Some(cluster) = shared.resolve_cluster(cluster, Some(dst)) else {
        return;
    };
    let only = pin.then_some(dst);
    crate::tcp::proxy(shared, cluster, stream, peer, only).await
}

/// Serves a connection the inbound capture listener took, sent to `dst`:
/// HTTP through the listener's routes, or TCP to the app.
pub async fn serve_inbound(
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    table: Arc<CaptureTable>,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    tracked: Tracked,
) {
    // The proxy's own ports are not the app's: a client outside the pod
    // must not reach the admin listener or the outbound listener (it
    // would borrow this workload's identity) through the inbound one.
    if PROXY_PORTS.contains(&dst.port())
        || shared
            .snapshot
            .load()
            .listeners
            .keys()
            .any(|a| a.port() == dst.port())
    {
        tracing::debug!(%peer, %dst, "inbound to a proxy port refused");
        return;
    }
    let target = table.target(dst);
    let declared = target.map_or(Protocol::Sniff, |t| t.protocol);
    // For TCP: a Sidecar `ingress` port's own app port, else the dialled
    // one (HTTP ports route through the inbound routes instead).
    let app = match (declared, target.and_then(|t| t.tcp.as_ref())) {
        (Protocol::Http, _) => None,
        (_, Some(r)) => Some(r.pick_with(&mut rand::rng()).clone()),
        (_, None) => table
            .passthrough
            .as_ref()
            .and_then(|p| shared.resolve_cluster(p, Some(dst))),
    };
    let tcp = match (declared, app) {
        (Protocol::Tcp | Protocol::Tls, Some(app)) => InboundTcp::Always(app),
        (Protocol::Sniff, Some(app)) => InboundTcp::Detect(app),
        _ => InboundTcp::Never,
    };
    let mode = target
        .and_then(|t| t.peer_mtls)
        .unwrap_or(listener.peer_mtls);
    let strict = mode == crate::config::PeerMtls::Strict;
    if mode == crate::config::PeerMtls::Disable {
        let deadline = sniff_deadline(&shared, &table);
        return match plaintext_tcp(tcp, &stream, deadline).await {
            Some(app) => crate::tcp::proxy(shared, app, stream, peer, None).await,
            None => {
                let local = listener.addr;
                crate::http::serve_connection(shared, stream, peer, local, Some(dst), tracked).await
            }
        };
    }
    let inbound = crate::http::serve::Inbound {
        original_dst: Some(dst),
        strict,
        tcp,
    };
    crate::http::serve::serve_inbound(shared, stream, peer, listener.addr, inbound, tracked).await
}

/// A plaintext inbound connection's app cluster when it is TCP (a TCP
/// port, or an undeclared one whose first bytes are not HTTP); `None`:
/// serve it as HTTP.
pub(crate) async fn plaintext_tcp(
    tcp: InboundTcp,
    stream: &TcpStream,
    deadline: tokio::time::Instant,
) -> Option<Arc<Cluster>> {
    match tcp {
        InboundTcp::Always(app) => Some(app),
        InboundTcp::Detect(app) if sniff(stream, deadline).await != Sniffed::Http => Some(app),
        _ => None,
    }
}

/// Whether an inbound connection is opaque TCP to the app.
pub enum InboundTcp {
    /// HTTP (no capture, or an HTTP port).
    Never,
    /// A TCP port: always.
    Always(Arc<Cluster>),
    /// Undeclared: over mTLS when the peer negotiated `istio` (TCP), in
    /// plaintext when the bytes are not HTTP.
    Detect(Arc<Cluster>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"\x16\x03\x01", false), Some(Sniffed::Tls));
        assert_eq!(classify(b"GET / HTTP/1.1", false), Some(Sniffed::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0", false), Some(Sniffed::Http));
        assert_eq!(classify(b"M-SEARCH * ", false), Some(Sniffed::Http));
        assert_eq!(classify(b"GE", false), None);
        assert_eq!(classify(b"", false), None);
        assert_eq!(classify(b"\x00\x01", false), Some(Sniffed::Other));
        assert_eq!(classify(b" GET", false), Some(Sniffed::Other));
        assert_eq!(classify(b"get / ", false), Some(Sniffed::Other));
        assert_eq!(
            classify(b"ABCDEFGHIJKLMNOPQRSTUVWX", true),
            Some(Sniffed::Other)
        );
    }

    #[test]
    fn sni_patterns() {
        assert!(sni_matches("*", "a.example.com"));
        assert!(sni_matches("*.example.com", "a.example.com"));
        assert!(!sni_matches("*.example.com", "example.com"));
        assert!(sni_matches("api.example.com", "api.example.com."));
        assert!(!sni_matches("api.example.com", "www.example.com"));
    }
}
