//! The HTTP path: one hyper connection per downstream client (HTTP/1.1 or
//! h2c, detected), one `handle` per request: route, pick, forward, record.
//!
//! Phases of a request:
//! 1. load the snapshot (one `ArcSwap::load`), find the listener's route table
//! 2. virtual host by authority, first matching route
//! 3. local reply (direct response, redirect, 404 NR) or weighted cluster pick
//! 4. endpoint pick (LB policy, hash key), 503 UH when there is none
//! 5. rewrite and forward through the pooled client (h1 keep-alive or h2)
//! 6. stream the response back; metrics and access log at end of stream

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::RngExt;

use crate::Shared;
use crate::cluster::{Endpoint, EndpointStats, HashKey, UpstreamProtocol, hash_bytes};
use crate::config::{Direction, ListenerKind};
use crate::metrics::{LabelSet, Protocol, RequestRecord};
use crate::route::{Action, RequestView, rewrite_path, strip_port};

pub type UpstreamClient = Client<HttpConnector, ReqBody>;

pub fn clients() -> (UpstreamClient, UpstreamClient) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(10)));
    let h1 = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .set_host(false)
        .build(connector.clone());
    let h2 = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .http2_only(true)
        .set_host(false)
        .build(connector);
    (h1, h2)
}

/// The downstream request body, counted on its way upstream.
pub struct ReqBody {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let f = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &f
            && let Some(d) = frame.data_ref()
        {
            self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        Poll::Ready(f)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What is recorded when the response ends.
struct Exchange {
    shared: Arc<Shared>,
    labels: Arc<LabelSet>,
    start: Instant,
    code: u16,
    flags: &'static str,
    protocol: Protocol,
    grpc_status: Option<u16>,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    /// Keeps the endpoint's in-flight count up until the response ends.
    _active: Option<ActiveGuard>,
    log: Option<Box<LogInfo>>,
}

struct ActiveGuard(Arc<EndpointStats>);

impl ActiveGuard {
    fn new(e: &Endpoint) -> Self {
        e.stats.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(e.stats.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

struct LogInfo {
    start_time: SystemTime,
    method: String,
    path: String,
    protocol: &'static str,
    authority: String,
    user_agent: String,
    request_id: String,
    forwarded_for: String,
    downstream_remote: SocketAddr,
    downstream_local: SocketAddr,
    route_name: Arc<str>,
    upstream_host: Option<Arc<str>>,
}

impl Exchange {
    fn finish(self) {
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.shared.metrics.record_request(RequestRecord {
            labels: &self.labels,
            protocol: self.protocol,
            code: self.code,
            flags: self.flags,
            grpc_status: self.grpc_status,
            duration_ms,
            request_bytes,
            response_bytes: self.response_bytes,
        });
        if let (Some(log), Some(sink)) = (self.log, &self.shared.access_log) {
            sink.write(serde_json::json!({
                "start_time": crate::accesslog::rfc3339(log.start_time),
                "method": log.method,
                "path": log.path,
                "protocol": log.protocol,
                "response_code": self.code,
                "response_flags": self.flags,
                "grpc_status": self.grpc_status,
                "bytes_received": request_bytes,
                "bytes_sent": self.response_bytes,
                "duration": duration_ms.round() as u64,
                "x_forwarded_for": log.forwarded_for,
                "user_agent": log.user_agent,
                "request_id": log.request_id,
                "authority": log.authority,
                "upstream_host": log.upstream_host.as_deref(),
                "upstream_cluster": &*self.labels.cluster,
                "route_name": &*log.route_name,
                "downstream_remote_address": log.downstream_remote.to_string(),
                "downstream_local_address": log.downstream_local.to_string(),
            }));
        }
    }
}

enum RespKind {
    /// From hyper's client (HTTP/2 upstreams, upgrades).
    Upstream(Incoming),
    /// From Bosun's own HTTP/1.1 upstream connection.
    H1(crate::upstream::H1Body),
    Full(Option<Bytes>),
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body: streamed from upstream or local; recorded when it ends.
pub struct RespBody {
    kind: RespKind,
    exchange: Option<Box<Exchange>>,
}

impl RespBody {
    fn done(&mut self) {
        if let Some(x) = self.exchange.take() {
            x.finish();
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        let ended = self.kind_ended();
        if let Some(x) = self.exchange.as_mut()
            && !ended
            && x.flags == "-"
        {
            x.flags = "DC";
        }
        self.done();
    }
}

impl RespBody {
    fn kind_ended(&self) -> bool {
        match &self.kind {
            RespKind::Full(_) => true,
            RespKind::Upstream(b) => b.is_end_stream(),
            RespKind::H1(b) => b.is_end_stream(),
        }
    }

    /// Counts bytes, reads grpc-status from trailers, records at the end.
    fn observe<E>(&mut self, f: &Option<Result<Frame<Bytes>, E>>, end: bool) {
        match f {
            Some(Ok(frame)) => {
                if let Some(x) = self.exchange.as_mut() {
                    if let Some(d) = frame.data_ref() {
                        x.response_bytes += d.len() as u64;
                    } else if let Some(t) = frame.trailers_ref() {
                        x.grpc_status = grpc_status(t).or(x.grpc_status);
                    }
                }
            }
            Some(Err(_)) => {
                if let Some(x) = self.exchange.as_mut() {
                    x.flags = "UC";
                }
            }
            None => {}
        }
        if f.is_none() || end {
            self.done();
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.kind {
            RespKind::Full(b) => {
                let f = b.take().map(|b| Ok(Frame::data(b)));
                if f.is_none() {
                    this.done();
                }
                Poll::Ready(f)
            }
            RespKind::Upstream(inner) => {
                let f = ready!(Pin::new(&mut *inner).poll_frame(cx));
                let end = inner.is_end_stream();
                this.observe(&f, end);
                Poll::Ready(f.map(|r| r.map_err(BoxError::from)))
            }
            RespKind::H1(inner) => {
                let f = ready!(Pin::new(&mut *inner).poll_frame(cx));
                let end = inner.is_end_stream();
                this.observe(&f, end);
                Poll::Ready(f.map(|r| r.map_err(BoxError::from)))
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RespKind::Full(b) => b.is_none(),
            RespKind::Upstream(b) => b.is_end_stream(),
            RespKind::H1(b) => b.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RespKind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespKind::Full(None) => SizeHint::with_exact(0),
            RespKind::Upstream(b) => b.size_hint(),
            RespKind::H1(b) => b.size_hint(),
        }
    }
}

fn grpc_status(h: &HeaderMap) -> Option<u16> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Serves one accepted connection (HTTP/1.1 or h2c prior knowledge).
pub async fn serve_connection(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    // Rendered once per connection, appended to x-forwarded-for per request.
    let peer_ip =
        HeaderValue::try_from(peer.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let peer = Peer {
            addr: peer,
            ip: peer_ip.clone(),
        };
        async move { Ok::<_, Infallible>(handle(shared, peer, local, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(60));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024);
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(%peer, error = %e, "downstream connection ended with an error");
    }
}

const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];

fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these: one scan, no hashing, no allocation.
    if !h
        .keys()
        .any(|k| k == header::TE || HOP_BY_HOP.iter().any(|n| n == k))
    {
        return;
    }
    if let Some(c) = h
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    {
        for name in c.split(',').map(str::trim) {
            if name.eq_ignore_ascii_case("keep-alive") || name.eq_ignore_ascii_case("close") {
                continue;
            }
            if keep_upgrade && name.eq_ignore_ascii_case("upgrade") {
                continue;
            }
            if let Ok(n) = HeaderName::try_from(name.to_ascii_lowercase()) {
                h.remove(n);
            }
        }
    }
    for n in &HOP_BY_HOP {
        if keep_upgrade && (n == header::CONNECTION || n == header::UPGRADE) {
            continue;
        }
        h.remove(n);
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// A random (v4) UUID, formatted in place: no intermediate strings.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [0u8; 36];
    let mut o = 0;
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[o] = b'-';
            o += 1;
        }
        out[o] = HEX[usize::from(x >> 4)];
        out[o + 1] = HEX[usize::from(x & 0xf)];
        o += 2;
    }
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("0"))
}

fn cookie_value<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| {
            c.split(';').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then_some(v)
            })
        })
}

struct Local {
    status: StatusCode,
    body: Bytes,
    flags: &'static str,
    location: Option<HeaderValue>,
}

fn local(status: StatusCode, body: &'static str, flags: &'static str) -> Local {
    Local {
        status,
        body: Bytes::from_static(body.as_bytes()),
        flags,
        location: None,
    }
}

struct Peer {
    addr: SocketAddr,
    ip: HeaderValue,
}

async fn handle(
    shared: Arc<Shared>,
    peer: Peer,
    local_addr: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<RespBody> {
    let peer_ip = peer.ip;
    let peer = peer.addr;
    let start = Instant::now();
    let snap = shared.snapshot.load();
    let protocol = if req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
    {
        Protocol::Grpc
    } else {
        Protocol::Http
    };
    let request_bytes = Arc::new(AtomicU64::new(0));
    let listener = snap.listeners.get(&local_addr).cloned();
    let inbound = listener
        .as_ref()
        .is_some_and(|l| l.direction == Direction::Inbound);
    let mk_exchange = |labels: Arc<LabelSet>,
                       code: u16,
                       flags: &'static str,
                       log: Option<Box<LogInfo>>,
                       active: Option<ActiveGuard>| {
        Box::new(Exchange {
            shared: shared.clone(),
            labels,
            start,
            code,
            flags,
            protocol,
            grpc_status: None,
            request_bytes: request_bytes.clone(),
            response_bytes: 0,
            _active: active,
            log,
        })
    };
    let no_route = shared.no_route_labels(inbound);
    let Some(listener) = listener else {
        return local_response(
            local(StatusCode::NOT_FOUND, "", "NR"),
            mk_exchange(no_route, 404, "NR", None, None),
            None,
        );
    };
    let ListenerKind::Http { route_table } = &listener.kind else {
        return local_response(
            local(StatusCode::NOT_FOUND, "", "NR"),
            mk_exchange(no_route, 404, "NR", None, None),
            None,
        );
    };
    // HTTP/2 carries :authority in the URI, HTTP/1.1 in Host (or an absolute URI).
    let authority_hv: HeaderValue = match req.uri().authority() {
        Some(a) => HeaderValue::try_from(a.as_str()).unwrap_or(HeaderValue::from_static("")),
        None => req
            .headers()
            .get(header::HOST)
            .cloned()
            .unwrap_or(HeaderValue::from_static("")),
    };
    let authority: &str = authority_hv.to_str().unwrap_or("");
    let port = if listener.direction == Direction::Outbound {
        authority
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(80)
    } else {
        listener.addr.port()
    };
    let mut log = shared.access_log.as_ref().map(|_| {
        Box::new(LogInfo {
            start_time: SystemTime::now(),
            method: req.method().to_string(),
            path: req
                .uri()
                .path_and_query()
                .map_or("/".into(), |p| p.as_str().to_string()),
            protocol: match req.version() {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            authority: authority.to_string(),
            user_agent: header_str(req.headers(), header::USER_AGENT),
            request_id: header_str(req.headers(), HeaderName::from_static("x-request-id")),
            forwarded_for: header_str(req.headers(), HeaderName::from_static("x-forwarded-for")),
            downstream_remote: peer,
            downstream_local: local_addr,
            route_name: Arc::from(""),
            upstream_host: None,
        })
    });

    let view = RequestView {
        path: req.uri().path(),
        query: req.uri().query(),
        authority,
        method: req.method(),
        scheme: "http",
        headers: req.headers(),
        port,
    };
    let Some((route, matched)) = route_table
        .virtual_host(authority)
        .and_then(|vh| vh.route(&view))
    else {
        return local_response(
            local(StatusCode::NOT_FOUND, "", "NR"),
            mk_exchange(no_route, 404, "NR", log, None),
            None,
        );
    };
    if let Some(l) = log.as_mut() {
        l.route_name = route.name.clone();
    }
    let ra = match &route.action {
        Action::Direct { status, body } => {
            let l = Local {
                status: *status,
                body: body.clone(),
                flags: "-",
                location: None,
            };
            let x = mk_exchange(no_route, status.as_u16(), "-", log, None);
            return local_response(l, x, Some(&route.response_ops));
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
            let path = r
                .uri
                .clone()
                .unwrap_or_else(|| req.uri().path().to_string());
            let query = req
                .uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            let loc = format!("{scheme}://{host_port}{path}{query}");
            let l = Local {
                status: r.status,
                body: Bytes::new(),
                flags: "-",
                location: HeaderValue::try_from(loc).ok(),
            };
            let x = mk_exchange(no_route, r.status.as_u16(), "-", log, None);
            return local_response(l, x, Some(&route.response_ops));
        }
        Action::Route(ra) => ra,
    };
    let cluster = ra.clusters.pick();
    let mut set_cookie = None;
    let key = match &cluster.hash {
        None => None,
        Some(HashKey::Header(h)) => req.headers().get(h).map(|v| hash_bytes(v.as_bytes())),
        Some(HashKey::SourceIp) => Some(hash_bytes(peer.ip().to_string().as_bytes())),
        Some(HashKey::Query(q)) => req.uri().query().and_then(|qs| {
            qs.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == q).then(|| hash_bytes(v.as_bytes()))
            })
        }),
        Some(HashKey::Cookie {
            name,
            path,
            ttl_seconds,
        }) => match cookie_value(req.headers(), name) {
            Some(v) => Some(hash_bytes(v.as_bytes())),
            None if *ttl_seconds > 0 => {
                let v: u64 = rand::rng().random();
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
    let Some(endpoint) = cluster.pick(key) else {
        let x = mk_exchange(cluster.no_endpoint_labels.clone(), 503, "UH", log, None);
        return local_response(
            local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream", "UH"),
            x,
            None,
        );
    };
    let endpoint = endpoint.clone();
    if let Some(l) = log.as_mut() {
        l.upstream_host = Some(endpoint.addr_str.clone());
    }
    let active = ActiveGuard::new(&endpoint);

    // Build the upstream request.
    let upgrade = is_upgrade(&req);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // The upstream URI: the endpoint's address as authority (pools are per
    // endpoint), the request's path and query (shared bytes, no copy) unless
    // rewritten.
    let path_and_query = match &ra.uri_rewrite {
        Some(rw) => {
            let p = rewrite_path(parts.uri.path(), matched, rw);
            let pq = match parts.uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            http::uri::PathAndQuery::try_from(pq).ok()
        }
        None => Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or(http::uri::PathAndQuery::from_static("/")),
        ),
    };
    let mut uri_parts = http::uri::Parts::default();
    uri_parts.scheme = Some(http::uri::Scheme::HTTP);
    uri_parts.authority = Some(endpoint.authority.clone());
    uri_parts.path_and_query = path_and_query;
    let uri = match Uri::from_parts(uri_parts) {
        Ok(u) => u,
        Err(_) => {
            let x = mk_exchange(endpoint.labels.clone(), 400, "-", log, None);
            return local_response(local(StatusCode::BAD_REQUEST, "bad path", "-"), x, None);
        }
    };
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, upgrade);
    let host = match &ra.authority_rewrite {
        Some(a) => a.clone(),
        None => authority_hv.clone(),
    };
    headers.insert(header::HOST, host);
    let xff = HeaderName::from_static("x-forwarded-for");
    let new_xff = match headers.get(&xff).and_then(|v| v.to_str().ok()) {
        Some(prev) => {
            HeaderValue::try_from(format!("{prev}, {}", peer_ip.to_str().unwrap_or(""))).ok()
        }
        None => Some(peer_ip),
    };
    if let Some(v) = new_xff {
        headers.insert(xff, v);
    }
    let xfp = HeaderName::from_static("x-forwarded-proto");
    if !headers.contains_key(&xfp) {
        headers.insert(xfp, HeaderValue::from_static("http"));
    }
    let rid = HeaderName::from_static("x-request-id");
    if !headers.contains_key(&rid) {
        let id = request_id();
        if let Some(l) = log.as_mut() {
            l.request_id = id.to_str().unwrap_or("").to_string();
        }
        headers.insert(rid, id);
    }
    route.request_ops.apply(headers);
    let downstream_version = parts.version;
    let use_h2 = match cluster.protocol {
        UpstreamProtocol::Http2 => true,
        UpstreamProtocol::Downstream => downstream_version == Version::HTTP_2,
        _ => false,
    } && !upgrade;
    parts.version = if use_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    parts.uri = uri;
    let req_body = ReqBody {
        inner: body,
        bytes: request_bytes.clone(),
    };
    const CONNECT_FAILURE: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
    const TERMINATION: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";
    let (mut parts, kind) = if use_h2 || upgrade {
        // HTTP/2 multiplexing and protocol upgrades: hyper's pooled client.
        let client = if use_h2 { &shared.h2 } else { &shared.h1 };
        let mut resp = match client.request(Request::from_parts(parts, req_body)).await {
            Ok(r) => r,
            Err(e) => {
                let (flags, msg) = if e.is_connect() {
                    ("UF", CONNECT_FAILURE)
                } else {
                    ("UC", TERMINATION)
                };
                tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, error = %e, flags, "upstream request failed");
                let x = mk_exchange(endpoint.labels.clone(), 503, flags, log, Some(active));
                return local_response(local(StatusCode::SERVICE_UNAVAILABLE, msg, flags), x, None);
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(down) = downstream_upgrade
        {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(down, up) {
                    Ok((d, u)) => {
                        let mut d = TokioIo::new(d);
                        let mut u = TokioIo::new(u);
                        let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
            let (parts, body) = resp.into_parts();
            (parts, RespKind::Upstream(body))
        } else {
            strip_hop_by_hop(resp.headers_mut(), false);
            let (mut parts, body) = resp.into_parts();
            parts.version = downstream_version;
            (parts, RespKind::Upstream(body))
        }
    } else {
        match crate::upstream::send(&endpoint.stats.idle, endpoint.addr, parts, req_body).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers, false);
                parts.version = downstream_version;
                (parts, RespKind::H1(body))
            }
            Err(e) => {
                let (flags, msg) = match e {
                    crate::upstream::SendError::Connect(_) => ("UF", CONNECT_FAILURE),
                    crate::upstream::SendError::Reset(_) => ("UC", TERMINATION),
                };
                tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, error = %e, flags, "upstream request failed");
                let x = mk_exchange(endpoint.labels.clone(), 503, flags, log, Some(active));
                return local_response(local(StatusCode::SERVICE_UNAVAILABLE, msg, flags), x, None);
            }
        }
    };
    let status = parts.status;
    route.response_ops.apply(&mut parts.headers);
    if let Some(c) = set_cookie {
        parts.headers.append(header::SET_COOKIE, c);
    }
    let mut x = mk_exchange(
        endpoint.labels.clone(),
        status.as_u16(),
        "-",
        log,
        Some(active),
    );
    x.grpc_status = grpc_status(&parts.headers);
    let body = RespBody {
        kind,
        exchange: Some(x),
    };
    Response::from_parts(parts, body)
}

fn header_str(h: &HeaderMap, name: HeaderName) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn local_response(
    l: Local,
    mut x: Box<Exchange>,
    ops: Option<&crate::route::HeaderOps>,
) -> Response<RespBody> {
    x.flags = l.flags;
    x.response_bytes = l.body.len() as u64;
    let mut resp = Response::new(RespBody {
        kind: RespKind::Full((!l.body.is_empty()).then_some(l.body)),
        exchange: Some(x),
    });
    *resp.status_mut() = l.status;
    if let Some(loc) = l.location {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    if l.flags != "-" {
        resp.headers_mut().insert(
            HeaderName::from_static("x-bosun-response-flags"),
            HeaderValue::from_static(l.flags),
        );
    }
    if let Some(ops) = ops {
        ops.apply(resp.headers_mut());
    }
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_uuid_v4() {
        let a = super::request_id();
        let s = a.to_str().expect("ascii");
        assert_eq!(s.len(), 36);
        let parts: Vec<&str> = s.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            vec![8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "{s}");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{s}");
        assert_ne!(a, super::request_id());
    }
}
