//! Bodies on the request path: the request body counted on its way
//! upstream, and the response body, streamed from upstream or local,
//! recorded (metrics, access log) when it ends.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::Shared;
use crate::cluster::{ClusterState, Endpoint, EndpointStats};
use crate::connect::Stream;
use crate::flags::Flags;
use crate::metrics::{LabelSet, Protocol, RequestRecord};

/// The downstream request body, counted on its way upstream. Frames read
/// ahead (to catch a malformed body before anything goes upstream, or to
/// keep a copy for retries and mirrors) are handed out first.
pub struct ReqBody {
    inner: Option<Incoming>,
    pending: VecDeque<Frame<Bytes>>,
    bytes: Option<Arc<AtomicU64>>,
    /// A replayed body's length is announced (Content-Length) only when the
    /// client announced it: a chunked request stays chunked.
    exact: bool,
}

/// Where a request's body comes from.
pub enum BodySource {
    /// Read from the client as it is forwarded (hyper's server).
    Stream(Incoming),
    /// Already read, whole, with its head (the lean path's small
    /// `Content-Length` bodies).
    Whole(Bytes),
}

/// A whole request body kept for another try or a mirror.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    exact: bool,
}

impl ReqBody {
    /// `None`: a request without a body.
    /// `bytes`: where the body's length is counted (a request without a
    /// body needs none).
    pub fn new(inner: Option<BodySource>, bytes: Option<Arc<AtomicU64>>) -> Self {
        match inner {
            Some(BodySource::Whole(data)) => {
                if let Some(b) = &bytes {
                    b.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                let mut pending = VecDeque::new();
                if !data.is_empty() {
                    pending.push_back(Frame::data(data));
                }
                // Its length is announced: it came with a Content-Length.
                ReqBody {
                    inner: None,
                    pending,
                    bytes: None,
                    exact: true,
                }
            }
            Some(BodySource::Stream(s)) => Self::streamed(Some(s), bytes),
            None => Self::streamed(None, bytes),
        }
    }

    fn streamed(inner: Option<Incoming>, bytes: Option<Arc<AtomicU64>>) -> Self {
        ReqBody {
            inner,
            pending: VecDeque::new(),
            bytes,
            exact: true,
        }
    }

    /// A body sent again from a copy (counted once, when it was read).
    pub fn replay(r: &Replay) -> Self {
        let mut pending: VecDeque<Frame<Bytes>> =
            r.data.iter().map(|d| Frame::data(d.clone())).collect();
        if let Some(t) = &r.trailers {
            pending.push_back(Frame::trailers(t.clone()));
        }
        ReqBody {
            inner: None,
            pending,
            bytes: None,
            exact: r.exact,
        }
    }

    async fn read_frame(&mut self) -> Result<Option<Frame<Bytes>>, hyper::Error> {
        use http_body_util::BodyExt;
        let Some(inner) = self.inner.as_mut() else {
            return Ok(None);
        };
        match inner.frame().await {
            None => Ok(None),
            Some(f) => {
                let f = f?;
                if let (Some(d), Some(b)) = (f.data_ref(), &self.bytes) {
                    b.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Ok(Some(f))
            }
        }
    }

    /// Reads the first frame now (a bad chunk size fails here, before the
    /// request head is sent anywhere).
    pub async fn read_ahead(&mut self) -> Result<(), hyper::Error> {
        if let Some(f) = self.read_frame().await? {
            self.pending.push_back(f);
        }
        Ok(())
    }

    /// Frames read ahead and not yet handed out.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Reads the body while it fits in `cap` bytes: the whole body comes
    /// back as a [`Replay`]; a larger one (`None`) keeps what was read and
    /// streams the rest, and cannot be sent twice. With `idle`, it waits
    /// for the client (up to `idle` per frame); without, it takes only what
    /// has already arrived, never waiting for the client, and a body that
    /// has not ended by then also streams (`None`).
    pub async fn buffer(
        &mut self,
        cap: usize,
        idle: Option<std::time::Duration>,
    ) -> Result<Option<Replay>, crate::error::ForwardError> {
        use crate::error::ForwardError;
        use futures_util::FutureExt;
        let exact = self.size_hint().exact().is_some();
        let mut size = 0usize;
        let mut yielded = false;
        loop {
            let read = match idle {
                Some(idle) => match tokio::time::timeout(idle, self.read_frame()).await {
                    Err(_) => return Err(ForwardError::StreamIdle(idle)),
                    Ok(r) => r,
                },
                None => match self.read_frame().now_or_never() {
                    Some(r) => r,
                    // Let the connection's own task read what is in its
                    // buffers, once.
                    None if !yielded => {
                        yielded = true;
                        tokio::task::yield_now().await;
                        continue;
                    }
                    None => return Ok(None),
                },
            };
            let Some(f) = read.map_err(|e| ForwardError::downstream(&e))? else {
                break;
            };
            size += f.data_ref().map_or(0, Bytes::len);
            self.pending.push_back(f);
            if size > cap {
                return Ok(None);
            }
        }
        let mut r = Replay {
            exact,
            ..Replay::default()
        };
        for f in &self.pending {
            if let Some(d) = f.data_ref() {
                r.data.push(d.clone());
            } else if let Some(t) = f.trailers_ref() {
                r.trailers = Some(t.clone());
            }
        }
        Ok(Some(r))
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(f) = self.pending.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let f = ready!(Pin::new(inner).poll_frame(cx));
        if let Some(Ok(frame)) = &f
            && let (Some(d), Some(b)) = (frame.data_ref(), &this.bytes)
        {
            b.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        Poll::Ready(f)
    }
    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }
    fn size_hint(&self) -> SizeHint {
        let n: u64 = self
            .pending
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let Some(inner) = &self.inner else {
            return if self.exact {
                SizeHint::with_exact(n)
            } else {
                SizeHint::default()
            };
        };
        let h = inner.size_hint();
        if n == 0 {
            return h;
        }
        // Upper first: `set_lower` refuses a lower bound above the upper one.
        let mut out = SizeHint::new();
        if let Some(u) = h.upper() {
            out.set_upper(u + n);
        }
        out.set_lower(h.lower() + n);
        out
    }
}

/// Keeps the endpoint's in-flight count (and the cluster's, and an
/// HTTP/1.1 connection slot of `maxConnections`) until the response ends.
pub struct ActiveGuard {
    endpoint: Arc<EndpointStats>,
    cluster: Option<Arc<ClusterState>>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl ActiveGuard {
    pub fn new(e: &Endpoint) -> Self {
        e.stats.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard {
            endpoint: e.stats.clone(),
            cluster: None,
            _slot: None,
        }
    }

    pub fn with_cluster(
        e: &Endpoint,
        c: &Arc<ClusterState>,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Self {
        let mut g = Self::new(e);
        c.active_requests.fetch_add(1, Ordering::Relaxed);
        g.cluster = Some(c.clone());
        g._slot = slot;
        g
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
        if let Some(c) = &self.cluster {
            c.active_requests.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What the access log needs beyond the metrics.
pub struct LogInfo {
    pub start_time: SystemTime,
    pub method: String,
    pub path: String,
    pub protocol: &'static str,
    pub authority: String,
    pub user_agent: String,
    pub request_id: String,
    pub forwarded_for: String,
    pub downstream_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    pub route_name: Arc<str>,
    pub upstream_host: Option<Arc<str>>,
}

/// What is recorded when the response ends.
pub struct Exchange {
    pub shared: Arc<Shared>,
    pub labels: Arc<LabelSet>,
    pub start: Instant,
    pub code: u16,
    pub flags: Flags,
    pub protocol: Protocol,
    pub grpc_status: Option<u16>,
    pub request_bytes: Option<Arc<AtomicU64>>,
    pub response_bytes: u64,
    pub active: Option<ActiveGuard>,
    pub log: Option<Box<LogInfo>>,
    /// Mutual TLS downstream: the peer's SPIFFE ID ("" if none).
    pub peer_principal: Option<Arc<str>>,
}

impl Exchange {
    fn finish(self) {
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let request_bytes = self
            .request_bytes
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed));
        self.shared.metrics.record_request(RequestRecord {
            labels: &self.labels,
            protocol: self.protocol,
            code: self.code,
            flags: self.flags,
            grpc_status: self.grpc_status,
            duration_ms,
            request_bytes,
            response_bytes: self.response_bytes,
            peer_principal: self.peer_principal.as_ref(),
        });
        if let (Some(log), Some(sink)) = (self.log, &self.shared.access_log) {
            sink.write(serde_json::json!({
                "start_time": crate::accesslog::rfc3339(log.start_time),
                "method": log.method,
                "path": log.path,
                "protocol": log.protocol,
                "response_code": self.code,
                "response_flags": self.flags.as_str(),
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
                "downstream_peer_uri_san": self.peer_principal.as_deref(),
            }));
        }
    }
}

pub enum RespKind {
    /// From hyper's client connection (HTTP/2 upstreams, upgrades).
    Upstream(Incoming),
    /// As `Upstream`, cut when the route timeout expires.
    Bounded(Incoming, Pin<Box<tokio::time::Sleep>>),
    /// From Bosun's own HTTP/1.1 upstream connection.
    H1(crate::h1::H1Body<Stream>),
    Full(Option<Bytes>),
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body: streamed from upstream or local; recorded when it ends.
pub struct RespBody {
    pub kind: RespKind,
    pub exchange: Option<Exchange>,
    /// Keeps the downstream connection busy (not idle) until the response ends.
    pub inflight: Option<crate::http::serve::InFlight>,
}

impl RespBody {
    fn done(&mut self) {
        if let Some(x) = self.exchange.take() {
            x.finish();
        }
        self.inflight = None;
    }

    fn kind_ended(&self) -> bool {
        match &self.kind {
            RespKind::Full(_) => true,
            RespKind::Upstream(b) | RespKind::Bounded(b, _) => b.is_end_stream(),
            RespKind::H1(b) => b.is_end_stream(),
        }
    }

    /// Counts bytes, reads grpc-status from trailers, records at the end.
    fn observe<E>(
        &mut self,
        f: &Option<Result<Frame<Bytes>, E>>,
        end: bool,
        err_flag: impl Fn(&E) -> Flags,
    ) {
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
            Some(Err(e)) => {
                if let Some(x) = self.exchange.as_mut() {
                    x.flags = err_flag(e);
                }
            }
            None => {}
        }
        if f.is_none() || end {
            self.done();
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        let ended = self.kind_ended();
        if let Some(x) = self.exchange.as_mut()
            && !ended
            && x.flags.is_none()
        {
            x.flags = Flags::DownstreamConnectionTermination;
        }
        self.done();
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
        if let RespKind::Bounded(_, deadline) = &mut this.kind
            && deadline.as_mut().poll(cx).is_ready()
        {
            // The route timeout: the rest of the body is cut.
            let cut: Option<Result<Frame<Bytes>, crate::h1::RouteTimeout>> =
                Some(Err(crate::h1::RouteTimeout));
            this.observe(&cut, true, |_| Flags::UpstreamRequestTimeout);
            this.kind = RespKind::Full(None);
            return Poll::Ready(Some(Err(BoxError::from(crate::h1::RouteTimeout))));
        }
        match &mut this.kind {
            RespKind::Full(b) => {
                let f = b.take().map(|b| Ok(Frame::data(b)));
                if f.is_none() {
                    this.done();
                }
                Poll::Ready(f)
            }
            RespKind::Upstream(inner) | RespKind::Bounded(inner, _) => {
                let f = ready!(Pin::new(&mut *inner).poll_frame(cx));
                let end = inner.is_end_stream();
                this.observe(&f, end, |e| {
                    if e.is_timeout() {
                        Flags::StreamIdleTimeout
                    } else {
                        Flags::UpstreamConnectionTermination
                    }
                });
                Poll::Ready(f.map(|r| r.map_err(BoxError::from)))
            }
            RespKind::H1(inner) => {
                let f = ready!(Pin::new(&mut *inner).poll_frame(cx));
                let end = inner.is_end_stream();
                this.observe(&f, end, |e| match e.kind() {
                    std::io::ErrorKind::TimedOut
                        if e.get_ref()
                            .is_some_and(|i| i.is::<crate::h1::RouteTimeout>()) =>
                    {
                        Flags::UpstreamRequestTimeout
                    }
                    std::io::ErrorKind::TimedOut => Flags::StreamIdleTimeout,
                    std::io::ErrorKind::InvalidData => Flags::UpstreamProtocolError,
                    _ => Flags::UpstreamConnectionTermination,
                });
                Poll::Ready(f.map(|r| r.map_err(BoxError::from)))
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RespKind::Full(b) => b.is_none(),
            RespKind::Upstream(b) | RespKind::Bounded(b, _) => b.is_end_stream(),
            RespKind::H1(b) => b.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RespKind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespKind::Full(None) => SizeHint::with_exact(0),
            RespKind::Upstream(b) | RespKind::Bounded(b, _) => b.size_hint(),
            RespKind::H1(b) => b.size_hint(),
        }
    }
}

pub fn grpc_status(h: &HeaderMap) -> Option<u16> {
    h.get(crate::http::headers::GRPC_STATUS)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
