//! *serve*: one task per downstream connection. It detects the protocol
//! (HTTP/1.1 or h2c prior knowledge) within the head timeout, drives
//! hyper's connection with the limits, closes the connection when it idles
//! too long, and on drain lets it finish what it started (`Connection:
//! close` on HTTP/1.1, GOAWAY on HTTP/2).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use bytes::BytesMut;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use crate::Shared;
use crate::drain::Tracked;
use crate::flags::Flags;
use crate::http::body::{
    ActiveGuard, BodySource, Exchange, LogInfo, RespBody, RespKind, grpc_status,
};
use crate::http::decide::{ConnContext, Decision, LocalReply, authority, decide};
use crate::http::forward::forward;
use crate::http::headers::{X_FORWARDED_FOR, X_REQUEST_ID, header_str, is_upgrade};
use crate::metrics::{LabelSet, Protocol};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Per-connection state the request tasks and the connection task share:
/// two counters, so a request pays two atomic additions and no clock read.
#[derive(Debug)]
pub struct ConnState {
    pub(crate) start: tokio::time::Instant,
    inflight: AtomicUsize,
    requests: AtomicU64,
}

/// Counts one request in flight on its connection until dropped.
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnState {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(ConnState {
            start: tokio::time::Instant::now(),
            inflight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn busy(&self) -> bool {
        self.inflight.load(Ordering::Acquire) > 0
    }
}

/// Reads until the bytes are, or cannot be, the HTTP/2 preface: whether
/// they are, and what was read (to be read again). `None`: the peer closed
/// or sent too little before the deadline.
async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
    deadline: tokio::time::Instant,
) -> Option<(bool, BytesMut)> {
    let mut head = [0u8; 24];
    let mut len = 0;
    let h2 = loop {
        if head[..len] != H2_PREFACE[..len] {
            break false;
        }
        if len == H2_PREFACE.len() {
            break true;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut head[len..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => len += n,
        }
    };
    Some((h2, BytesMut::from(&head[..len])))
}

/// hyper's two connection types, shut down the same way.
trait Graceful: Future {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// How a connection hears of a drain.
#[derive(Clone, Copy)]
enum OnDrain {
    /// HTTP/2: GOAWAY at once (the client learns which streams were not
    /// taken and may retry them safely).
    GoAway,
    /// HTTP/1.1: its next response carries `Connection: close` and the
    /// connection closes after it. An idle one is not closed under the
    /// client, which may be writing a request that very moment (the
    /// keep-alive race); it goes at its idle timeout or when the drain ends.
    CloseAfterResponse,
}

/// Drives a connection: closes it when idle past its deadline, and on
/// drain as `on_drain` says.
async fn drive<C>(shared: &Shared, state: &ConnState, conn: C, peer: SocketAddr, on_drain: OnDrain)
where
    C: Graceful,
    C::Output: Into<Result<(), hyper::Error>>,
{
    let mut conn = std::pin::pin!(conn);
    let mut drain = shared.drain.watch();
    let mut draining = *drain.borrow();
    if draining && matches!(on_drain, OnDrain::GoAway) {
        conn.as_mut().graceful();
    }
    // One timer per connection, looked at lazily: a request costs it two
    // atomic additions and no clock read. Until the first request it looks
    // every idle timeout and closes at the head timeout; after that, a
    // connection with nothing in flight and no request since the last look
    // is closed (so an idle connection goes after one to two idle timeouts).
    let limits = &shared.limits;
    let head_deadline = state.start + limits.request_head_timeout;
    let timer = tokio::time::sleep_until(head_deadline.min(state.start + limits.idle_timeout));
    let mut timer = std::pin::pin!(timer);
    let mut seen = 0;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r.into() {
                    tracing::debug!(%peer, error = %e, "downstream connection ended with an error");
                }
                return;
            }
            () = timer.as_mut() => {
                let now = tokio::time::Instant::now();
                let requests = state.requests();
                let idle = if requests == 0 {
                    now >= head_deadline
                } else {
                    !state.busy() && requests == seen
                };
                if idle {
                    tracing::debug!(%peer, requests, "closing an idle downstream connection");
                    conn.as_mut().graceful();
                    // A peer that ignores the close gets a second to go.
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => return,
                    }
                }
                seen = requests;
                let next = now + limits.idle_timeout;
                timer.as_mut().reset(if requests == 0 { next.min(head_deadline) } else { next });
            }
            // HTTP/1.1 needs nothing here: its responses carry
            // `Connection: close` once draining. Not polling the drain
            // watch on every wake-up keeps it off the per-request path.
            _ = drain.changed(), if !draining && matches!(on_drain, OnDrain::GoAway) => {
                draining = true;
                conn.as_mut().graceful();
            }
        }
    }
}

/// Serves one accepted connection (HTTP/1.1 or h2c prior knowledge).
/// `original_dst`: where the client sent it, when capture redirected it.
pub async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    original_dst: Option<SocketAddr>,
    tracked: Tracked,
) {
    let state = ConnState::new();
    let mut conn = ConnContext::new(peer, local);
    conn.original_dst = original_dst;
    serve_io(shared, state, stream, conn, tracked).await
}

/// A TLS handshake within `deadline`, its session tickets sent at once
/// (they are queued after the handshake; a client may reconnect before the
/// first response). `Err(None)`: the deadline passed.
async fn handshake(
    config: Arc<rustls::ServerConfig>,
    stream: TcpStream,
    deadline: tokio::time::Instant,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, Option<io::Error>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let mut tls = tokio::time::timeout_at(deadline, acceptor.accept(stream))
        .await
        .map_err(|_| None)?
        .map_err(Some)?;
    let _ = tokio::io::AsyncWriteExt::flush(&mut tls).await;
    Ok(tls)
}

/// The request context of a TLS connection: who the peer proved to be.
fn tls_context(
    shared: &Shared,
    tls: &tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    local: SocketAddr,
    original_dst: Option<SocketAddr>,
) -> ConnContext {
    let mut conn = ConnContext::new(peer, local);
    conn.original_dst = original_dst;
    let peer_id = crate::tls::PeerIdentity::from_certs(tls.get_ref().1.peer_certificates());
    conn.tls = Some(Arc::new(DownstreamTls::new(peer_id, shared.tls.spiffe())));
    conn
}

/// How an inbound connection is served: where the client sent it (with
/// capture), STRICT or PERMISSIVE, and whether it is TCP to the app.
pub struct Inbound {
    pub original_dst: Option<SocketAddr>,
    pub strict: bool,
    pub tcp: crate::capture::InboundTcp,
}

/// Serves a sidecar's inbound connection under PeerAuthentication: a TLS
/// ClientHello (first byte 0x16, peeked, nothing consumed) is Istio mutual
/// TLS: the handshake requires a client certificate from the mesh roots
/// and the peer's identity goes with every request; anything else is
/// plaintext, refused under STRICT. Both within the head timeout.
pub async fn serve_inbound(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    inbound: Inbound,
    tracked: Tracked,
) {
    use crate::capture::InboundTcp;
    let Inbound {
        original_dst,
        strict,
        tcp,
    } = inbound;
    let state = ConnState::new();
    let deadline = state.start + shared.limits.request_head_timeout;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == 0x16 => {}
        Ok(Ok(1)) if !strict => {
            if let Some(app) = crate::capture::plaintext_tcp(tcp, &stream, deadline).await {
                return crate::tcp::proxy(shared, app, stream, peer, None).await;
            }
            let mut conn = ConnContext::new(peer, local);
            conn.original_dst = original_dst;
            return serve_io(shared, state, stream, conn, tracked).await;
        }
        Ok(Ok(1)) => {
            shared.metrics.mtls_refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "plaintext refused: mutual TLS is STRICT here");
            return;
        }
        _ => return,
    }
    let tls = match handshake(shared.mesh_server.clone(), stream, deadline).await {
        Ok(tls) => tls,
        Err(e) => {
            if let Some(e) = e {
                shared.metrics.mtls_refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, error = %e, "mutual TLS handshake refused");
            }
            return;
        }
    };
    // Istio's ALPN for TCP over mesh mTLS is `istio` alone.
    let alpn_tcp = tls.get_ref().1.alpn_protocol() == Some(b"istio".as_slice());
    match tcp {
        InboundTcp::Always(app) => return crate::tcp::proxy(shared, app, tls, peer, None).await,
        InboundTcp::Detect(app) if alpn_tcp => {
            return crate::tcp::proxy(shared, app, tls, peer, None).await;
        }
        _ => {}
    }
    let conn = tls_context(&shared, &tls, peer, local, original_dst);
    serve_io(shared, state, tls, conn, tracked).await
}

/// A gateway listener with TLS servers: the ClientHello (peeked) picks
/// the server by SNI; PASSTHROUGH forwards the raw connection, the others
/// terminate TLS and serve HTTP (or TCP, for TLS-protocol servers).
pub async fn serve_gateway_tls(
    shared: Arc<Shared>,
    l: Arc<crate::config::Listener>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    tracked: Tracked,
) {
    use crate::config::ListenerKind;
    use crate::tls::server::ServerKind;
    let state = ConnState::new();
    let deadline = state.start + shared.limits.request_head_timeout;
    let Some(servers) = &l.tls else {
        return;
    };
    let Some(hello) = crate::tls::server::peek_hello(&stream, deadline).await else {
        tracing::debug!(%peer, "no TLS ClientHello; closing");
        return;
    };
    let Some(server) = servers.choose(hello.sni.as_deref()) else {
        tracing::debug!(%peer, sni = ?hello.sni, "no server for this SNI; closing");
        return;
    };
    let config = match &server.kind {
        ServerKind::Passthrough(route) => {
            let cluster = route.pick_with(&mut rand::rng()).clone();
            return crate::tcp::proxy(shared, cluster, stream, peer, None).await;
        }
        ServerKind::Terminate(c) => c.clone(),
    };
    let tls = match handshake(config, stream, deadline).await {
        Ok(tls) => tls,
        Err(e) => {
            if let Some(e) = e {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
            }
            return;
        }
    };
    match &l.kind {
        ListenerKind::Http { .. } => {
            let conn = tls_context(&shared, &tls, peer, local, None);
            serve_io(shared, state, tls, conn, tracked).await
        }
        ListenerKind::Tcp { route: Some(route) } => {
            let cluster = route.pick_with(&mut rand::rng()).clone();
            crate::tcp::proxy(shared, cluster, tls, peer, None).await
        }
        ListenerKind::Tcp { route: None } => {}
    }
}

/// What a downstream TLS connection proved, rendered once for its requests.
#[derive(Debug)]
pub struct DownstreamTls {
    /// The client presented a certificate (mutual TLS).
    pub mutual: bool,
    /// The peer's SPIFFE ID (`source_principal`).
    pub principal: Option<Arc<str>>,
    /// Envoy's `x-forwarded-client-cert` element for this peer.
    pub xfcc: Option<HeaderValue>,
}

impl DownstreamTls {
    pub fn new(peer: Option<crate::tls::PeerIdentity>, own: Option<String>) -> DownstreamTls {
        let Some(peer) = peer else {
            return DownstreamTls {
                mutual: false,
                principal: None,
                xfcc: None,
            };
        };
        let mut x = String::new();
        if let Some(own) = &own {
            x.push_str(&format!("By={own};"));
        }
        x.push_str(&format!("Hash={}", peer.hash));
        if let Some(uri) = &peer.spiffe {
            x.push_str(&format!(";URI={uri}"));
        }
        DownstreamTls {
            mutual: true,
            principal: peer.spiffe.map(Arc::from),
            xfcc: HeaderValue::try_from(x).ok(),
        }
    }
}

pub(crate) async fn serve_io<S>(
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    stream: S,
    conn: ConnContext,
    _tracked: Tracked,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.limits.clone();
    let peer = conn.peer;
    let mut stream = stream;
    let deadline = state.start + limits.request_head_timeout;
    let Some((h2, read)) = detect(&mut stream, deadline).await else {
        tracing::debug!(%peer, "no request within the head timeout; closing");
        return;
    };
    let conn = Arc::new(conn);
    let io = if h2 {
        crate::http::lean::Rewind::new(read, stream)
    } else {
        // The common HTTP/1.1 request is served here, without hyper; the
        // first other one hands the connection (and what was read) to it.
        match crate::http::lean::serve(&shared, &state, &conn, stream, read).await {
            Some(rest) => rest,
            None => return,
        }
    };
    let (sh, st) = (shared.clone(), state.clone());
    let svc = hyper::service::service_fn(move |req| {
        use futures_util::FutureExt;
        // `map`, not an async block around it: one large future fewer to
        // move per request.
        handle_hyper(sh.clone(), conn.clone(), st.clone(), req).map(Ok::<_, Infallible>)
    });
    let io = TokioIo::new(io);
    if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(limits.max_request_head_bytes as u32)
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(1024));
        drive(
            &shared,
            &state,
            b.serve_connection(io, svc),
            peer,
            OnDrain::GoAway,
        )
        .await;
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(limits.request_head_timeout)
            .max_header_size(limits.max_request_head_bytes);
        if limits.max_request_headers != 100 {
            // hyper's default is 100 on the stack; another count costs a heap array.
            b.max_headers(limits.max_request_headers);
        }
        let conn = b.serve_connection(io, svc).with_upgrades();
        drive(&shared, &state, conn, peer, OnDrain::CloseAfterResponse).await;
    }
}

/// Builds the recorded response: metrics and access log at its end.
pub struct Recorder {
    shared: Arc<Shared>,
    start: Instant,
    protocol: Protocol,
    /// The request body's bytes as they are read; a request without a body
    /// has none (no allocation).
    request_bytes: Option<Arc<AtomicU64>>,
    log: Option<Box<LogInfo>>,
    h1: bool,
    inflight: InFlight,
    /// A flag for a response that otherwise went well (DI, URX, UO).
    flags: Flags,
    /// Mutual TLS downstream: the peer's SPIFFE ID ("" if none).
    peer_principal: Option<Arc<str>>,
    /// The downstream (the lean path) writes an upstream's response
    /// headers as they came when they are left raw.
    raw_response: bool,
}

impl Recorder {
    pub fn raw_response(&self) -> bool {
        self.raw_response && self.protocol != Protocol::Grpc
    }

    pub fn set_flags(&mut self, f: Flags) {
        self.flags = f;
    }

    /// The counter a request body adds its bytes to.
    pub fn request_bytes(&mut self) -> Arc<AtomicU64> {
        self.request_bytes
            .get_or_insert_with(|| Arc::new(AtomicU64::new(0)))
            .clone()
    }

    pub fn set_upstream_host(&mut self, host: &Arc<str>) {
        if let Some(l) = self.log.as_mut() {
            l.upstream_host = Some(host.clone());
        }
    }

    pub fn set_request_id(&mut self, id: &str) {
        if let Some(l) = self.log.as_mut() {
            l.request_id = id.to_string();
        }
    }

    fn exchange(
        self,
        labels: Arc<LabelSet>,
        code: u16,
        flags: Flags,
        active: Option<ActiveGuard>,
    ) -> (Exchange, bool, InFlight) {
        let close = self.h1 && self.shared.drain.is_draining();
        (
            Exchange {
                shared: self.shared,
                labels,
                start: self.start,
                code,
                flags,
                protocol: self.protocol,
                grpc_status: None,
                request_bytes: self.request_bytes,
                response_bytes: 0,
                active,
                log: self.log,
                peer_principal: self.peer_principal,
            },
            close,
            self.inflight,
        )
    }

    pub fn local(self, l: LocalReply<'_>) -> Response<RespBody> {
        self.local_with(l, None)
    }

    pub fn local_with(self, l: LocalReply<'_>, active: Option<ActiveGuard>) -> Response<RespBody> {
        // A malformed request ends its HTTP/1.1 connection (its framing
        // cannot be trusted any more), as nginx does.
        let malformed = self.h1 && l.flags == Flags::DownstreamProtocolError;
        // A reply with no flag of its own keeps the request's (DI).
        let flags = if l.flags.is_none() {
            self.flags
        } else {
            l.flags
        };
        let (mut x, close, inflight) = self.exchange(l.labels, l.status.as_u16(), flags, active);
        x.response_bytes = l.body.len() as u64;
        let mut resp = Response::new(RespBody {
            kind: RespKind::Full((!l.body.is_empty()).then_some(l.body)),
            exchange: Some(x),
            inflight: Some(inflight),
        });
        *resp.status_mut() = l.status;
        if let Some(loc) = l.location {
            resp.headers_mut().insert(header::LOCATION, loc);
        }
        if let Some(h) = l.headers {
            resp.headers_mut().extend(*h);
        }
        if !flags.is_none() {
            resp.headers_mut().insert(
                HeaderName::from_static("x-bosun-response-flags"),
                HeaderValue::from_static(flags.as_str()),
            );
        }
        if let Some(ops) = l.response_ops {
            ops.apply(resp.headers_mut());
        }
        if close || malformed {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    pub fn upstream(
        self,
        mut parts: http::response::Parts,
        kind: RespKind,
        labels: Arc<LabelSet>,
        active: ActiveGuard,
    ) -> Response<RespBody> {
        let flags = self.flags;
        let (mut x, close, inflight) =
            self.exchange(labels, parts.status.as_u16(), flags, Some(active));
        if x.protocol == Protocol::Grpc {
            x.grpc_status = grpc_status(&parts.headers);
        }
        if close {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Response::from_parts(
            parts,
            RespBody {
                kind,
                exchange: Some(x),
                inflight: Some(inflight),
            },
        )
    }
}

/// A request from hyper (HTTP/2, and HTTP/1.1 the lean path hands over).
fn handle_hyper(
    shared: Arc<Shared>,
    conn: Arc<ConnContext>,
    state: Arc<ConnState>,
    mut req: Request<Incoming>,
) -> impl Future<Output = Response<RespBody>> {
    let upgrade = is_upgrade(req.version(), req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    async move {
        handle(
            &shared,
            &conn,
            &state,
            &mut parts,
            Some(BodySource::Stream(body)),
            upgrade,
            false,
        )
        .await
    }
}

/// One request, to its response: decided, then answered or forwarded.
/// `body`: `None` for a request without one. `raw_response`: the caller
/// writes an HTTP/1.1 upstream's headers left raw (`h1::RawHeaders` in the
/// body) itself; only the lean path does.
pub(crate) async fn handle(
    shared: &Arc<Shared>,
    conn: &Arc<ConnContext>,
    state: &Arc<ConnState>,
    parts: &mut http::request::Parts,
    body: Option<BodySource>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    raw_response: bool,
) -> Response<RespBody> {
    let start = Instant::now();
    let inflight = state.begin();
    let protocol = if crate::http::decide::is_grpc(&parts.headers) {
        Protocol::Grpc
    } else {
        Protocol::Http
    };
    let snap = shared.snapshot.load();
    let decided = decide(&snap, conn, parts, &mut rand::rng());
    let log = shared.access_log.as_ref().map(|_| {
        Box::new(LogInfo {
            start_time: SystemTime::now(),
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or("/".into(), |p| p.as_str().to_string()),
            protocol: match parts.version {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            authority: authority(parts).to_str().unwrap_or("").to_string(),
            user_agent: header_str(&parts.headers, header::USER_AGENT),
            request_id: header_str(&parts.headers, X_REQUEST_ID),
            forwarded_for: header_str(&parts.headers, X_FORWARDED_FOR),
            downstream_remote: conn.peer,
            // Envoy's DOWNSTREAM_LOCAL_ADDRESS: the original destination under capture.
            downstream_local: conn.original_dst.unwrap_or(conn.local),
            route_name: decided.route_name.map_or_else(|| Arc::from(""), Arc::clone),
            upstream_host: None,
        })
    });
    let rec = Recorder {
        shared: shared.clone(),
        start,
        protocol,
        request_bytes: None,
        log,
        h1: parts.version != Version::HTTP_2,
        inflight,
        flags: Flags::None,
        peer_principal: conn
            .tls
            .as_ref()
            .filter(|t| t.mutual)
            .map(|t| t.principal.clone().unwrap_or_else(|| Arc::from(""))),
        raw_response,
    };
    match decided.decision {
        Decision::Local(l) => rec.local(l),
        Decision::Forward(plan) => forward(shared, conn, plan, parts, body, upgrade, rec).await,
    }
}
