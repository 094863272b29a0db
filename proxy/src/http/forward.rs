//! *forward*: carries out a [`Plan`]. The upstream stack, in order:
//!
//! ```text
//! fault     the injected delay (DI), then an injected abort (FI)
//! prepare   upstream headers (hop-by-hop, Host, x-forwarded-*, request id)
//! limits    connectionPool: max requests → 503 UO
//! body      kept (up to a cap) when retries or mirrors need it again
//! mirror    fire-and-forget copies to the mirror clusters (`-shadow` host)
//! timeout   the route timeout bounds every try and backoff (504 UT)
//! retry     per try: pick (outlier state, locality priority, not a host
//!           tried before), a connection slot (maxConnections, pending),
//!           send with the per-try timeout, report to outlier detection;
//!           a retriable answer is retried after a full-jitter backoff
//!           within the attempts and the retry budget (URX, UO)
//! send      the endpoint's pool: HTTP/1.1 in this task, HTTP/2 multiplexed,
//!           upgrades on a fresh connection; every connection from `connect`
//! respond   hop-by-hop stripped, route response headers, CORS, hash cookie
//! ```

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::Shared;
use crate::cluster::{Cluster, Endpoint};
use crate::error::ForwardError;
use crate::flags::Flags;
use crate::h1;
use crate::http::body::{ActiveGuard, BodySource, Replay, ReqBody, RespBody, RespKind};
use crate::http::decide::{ConnContext, LocalReply, Plan, fault_reply};
use crate::http::headers::{
    X_FORWARDED_FOR, X_FORWARDED_PROTO, X_REQUEST_ID, request_id, strip_hop_by_hop,
};
use crate::http::serve::Recorder;
use crate::metrics::LabelSet;
use crate::outlier::Outcome;
use crate::policy::{RetryOn, RetryPolicy, TryFailure, roll};
use crate::tls::Alpn;

/// A request body kept for retries and mirrors is at most this (Envoy keeps
/// up to its 1 MiB connection buffer; a larger body is sent once, streamed).
pub const RETRY_BUFFER_BYTES: usize = 64 * 1024;

const OVERFLOW: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

fn reply(
    status: StatusCode,
    body: &'static str,
    flags: Flags,
    labels: Arc<LabelSet>,
) -> LocalReply<'static> {
    LocalReply {
        status,
        body: bytes::Bytes::from_static(body.as_bytes()),
        flags,
        location: None,
        labels,
        response_ops: None,
        headers: None,
    }
}

fn overflow(labels: Arc<LabelSet>) -> LocalReply<'static> {
    let mut r = reply(
        StatusCode::SERVICE_UNAVAILABLE,
        OVERFLOW,
        Flags::UpstreamOverflow,
        labels,
    );
    let mut h = http::HeaderMap::new();
    h.insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    r.headers = Some(Box::new(h));
    r
}

/// 503 `UH`: the cluster had no endpoint to pick.
fn no_healthy_upstream(cluster: &Cluster) -> LocalReply<'static> {
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "no healthy upstream",
        Flags::NoHealthyUpstream,
        cluster.no_endpoint_labels.clone(),
    )
}

fn upstream_timeout(labels: Arc<LabelSet>) -> LocalReply<'static> {
    reply(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream request timeout",
        Flags::UpstreamRequestTimeout,
        labels,
    )
}

/// A head with nothing in it (no allocation): what is left where a head
/// was taken.
fn empty_head() -> http::request::Parts {
    Request::new(()).into_parts().0
}

/// A copy of a request head for one more try or a mirror.
fn copy_head(p: &http::request::Parts) -> http::request::Parts {
    let mut r = Request::new(());
    *r.method_mut() = p.method.clone();
    *r.uri_mut() = p.uri.clone();
    *r.version_mut() = p.version;
    *r.headers_mut() = p.headers.clone();
    r.into_parts().0
}

/// The upstream URI of a try: HTTP/1.1 names the endpoint (the Host header
/// names the service); HTTP/2 carries the Host as `:authority` (RFC 9113
/// 8.3.1), so the Host header moves there.
fn set_upstream_uri(parts: &mut http::request::Parts, e: &Endpoint) -> Result<(), ()> {
    let authority = if parts.version == Version::HTTP_2 {
        match parts.headers.remove(header::HOST) {
            Some(h) => http::uri::Authority::try_from(h.as_bytes()).map_err(|_| ())?,
            // A later try: the first one moved it.
            None => parts
                .uri
                .authority()
                .cloned()
                .unwrap_or_else(|| e.authority.clone()),
        }
    } else {
        e.authority.clone()
    };
    let mut uri_parts = http::uri::Parts::default();
    uri_parts.scheme = Some(http::uri::Scheme::HTTP);
    uri_parts.authority = Some(authority);
    uri_parts.path_and_query = parts.uri.path_and_query().cloned();
    parts.uri = Uri::from_parts(uri_parts).map_err(|_| ())?;
    Ok(())
}

/// The endpoint a try went to, counted in flight while its answer lasts.
struct Attempt<'s> {
    /// Borrowed from the snapshot the plan was made from (no count taken).
    endpoint: &'s Endpoint,
    active: ActiveGuard,
}

/// A try's request head: lent by the request (HTTP/1.1, or a try that may
/// be followed by another) or handed over (the last HTTP/2 try).
#[allow(clippy::large_enum_variant)] // one per try, on the stack; boxing costs an allocation per request
enum Head<'a> {
    Lent(&'a mut http::request::Parts),
    Owned(http::request::Parts),
}

impl Head<'_> {
    fn parts_mut(&mut self) -> &mut http::request::Parts {
        match self {
            Head::Lent(p) => p,
            Head::Owned(p) => p,
        }
    }
}

/// How one try ended.
#[allow(clippy::large_enum_variant)] // one per try, on the stack; boxing costs an allocation per request
enum Tried<'s> {
    Response(Response<RespKind>, Attempt<'s>),
    Failed(ForwardError, Attempt<'s>),
    /// The per-try timeout expired.
    TimedOut(Attempt<'s>),
    /// No endpoint could be picked.
    NoEndpoint,
    /// A circuit breaker was full.
    Overflow,
}

pub async fn forward(
    shared: &Arc<Shared>,
    conn: &ConnContext,
    plan: Plan<'_>,
    parts: &mut http::request::Parts,
    body: Option<BodySource>,
    downstream_upgrade: Option<OnUpgrade>,
    mut rec: Recorder,
) -> Response<RespBody> {
    // An ORIGINAL_DST cluster (PassthroughCluster, resolution NONE, the
    // app behind a captured inbound connection): the one for where the
    // client sent it.
    let resolved;
    let plan = if plan.cluster.original_dst.is_some() {
        match shared.resolve_cluster(plan.cluster, conn.original_dst) {
            Some(c) => {
                resolved = c;
                Plan {
                    cluster: &resolved,
                    ..plan
                }
            }
            None => return rec.local(no_healthy_upstream(plan.cluster)),
        }
    } else {
        plan
    };
    let cluster = plan.cluster;
    let policy = &plan.action.policy;
    if let Some(d) = plan.delay {
        rec.set_flags(Flags::DelayInjected);
        tokio::time::sleep(d).await;
    }
    if let Some(a) = &plan.abort {
        let mut r = fault_reply(a, plan.grpc, cluster.no_endpoint_labels.clone());
        r.flags = Flags::DelayedThenAborted;
        return rec.local(r);
    }

    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, plan.upgrade);
    // Host, x-forwarded-for, -proto and x-request-id go straight into an
    // HTTP/1.1 upstream's head (`h1::Added`), not through the map, when
    // nothing reads the map after this: no route request headers, no
    // mirror, no HTTP/2 upstream, no upgrade.
    let direct = !plan.use_h2
        && !plan.upgrade
        && plan.route.request_ops.is_empty()
        && policy.mirrors.is_empty();
    let mut added = h1::Added {
        host: Some(&plan.host),
        ..Default::default()
    };
    // Which forwarding headers the client sent: one scan, no lookups by
    // name for the ones it did not (the common request has none of them).
    let xfcc = HeaderName::from_static("x-forwarded-client-cert");
    let (mut has_xff, mut has_xfp, mut has_xfcc, mut has_rid) = (false, false, false, false);
    for k in headers.keys() {
        has_xff |= *k == X_FORWARDED_FOR;
        has_xfp |= *k == X_FORWARDED_PROTO;
        has_xfcc |= *k == xfcc;
        has_rid |= *k == X_REQUEST_ID;
    }
    let prev_xff = if has_xff {
        headers.get(X_FORWARDED_FOR)
    } else {
        None
    };
    let new_xff = match prev_xff.and_then(|v| v.to_str().ok()) {
        Some(prev) => {
            HeaderValue::try_from(format!("{prev}, {}", conn.peer_ip.to_str().unwrap_or(""))).ok()
        }
        None => Some(conn.peer_ip.clone()),
    };
    added.xff = new_xff;
    if !has_xfp {
        added.xfp = Some(if conn.tls.is_some() { "https" } else { "http" });
    }
    // x-forwarded-client-cert as Istio's sidecars set it (Envoy's
    // APPEND_FORWARD): over mutual TLS our element for the peer is
    // appended; otherwise any the client sent is dropped, so nobody can
    // claim an identity by writing a header.
    match conn.tls.as_ref().and_then(|t| t.xfcc.as_ref()) {
        Some(mine) => {
            let prev = if has_xfcc { headers.get(&xfcc) } else { None };
            let v = match prev.and_then(|v| v.to_str().ok()) {
                Some(prev) => {
                    HeaderValue::try_from(format!("{prev},{}", mine.to_str().unwrap_or("")))
                        .unwrap_or_else(|_| mine.clone())
                }
                None => mine.clone(),
            };
            headers.insert(xfcc, v);
        }
        None if has_xfcc => {
            headers.remove(&xfcc);
        }
        None => {}
    }
    if !has_rid {
        let id = request_id();
        rec.set_request_id(id.as_str());
        added.rid = Some(id);
    }
    // Bound for the map, they are set before the route's own operations.
    let added = if direct {
        Some(added)
    } else {
        added.insert_into(headers);
        None
    };
    plan.route.request_ops.apply(headers);
    let downstream_version = parts.version;
    parts.version = if plan.use_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    parts.uri = Uri::from(plan.path_and_query.clone());

    // connectionPool.http.http2MaxRequests: requests in flight to the cluster.
    if cluster.limits.max_requests > 0
        && cluster.state.active_requests.load(Ordering::Relaxed)
            >= cluster.limits.max_requests as usize
    {
        return rec.local(overflow(cluster.no_endpoint_labels.clone()));
    }

    let stream_idle = shared.limits.stream_idle_timeout;
    let counter = body.as_ref().map(|_| rec.request_bytes());
    let mut req_body = ReqBody::new(body, counter);
    // The body, kept whole when another try or a mirror needs it (and it
    // fits); otherwise its first frame is read ahead: a malformed chunked
    // body is refused before anything goes upstream.
    let mut replay: Option<Replay> = None;
    if http_body::Body::is_end_stream(&req_body) {
        replay = Some(Replay::default());
    } else if !plan.upgrade {
        let ahead = async {
            if policy.replays_body() {
                let announced = http_body::Body::size_hint(&req_body).exact();
                replay = match announced {
                    // The client committed to this many bytes: wait for them.
                    Some(n) if n <= RETRY_BUFFER_BYTES as u64 => {
                        req_body
                            .buffer(RETRY_BUFFER_BYTES, Some(stream_idle))
                            .await?
                    }
                    Some(_) => None,
                    // A stream of unknown length (chunked, HTTP/2, gRPC) is
                    // kept only if it has already ended: a client that waits
                    // for an answer before it ends (a gRPC stream) must not
                    // be held back; it is streamed and not retried.
                    None => req_body.buffer(RETRY_BUFFER_BYTES, None).await?,
                };
            }
            if replay.is_none() && !plan.use_h2 && !req_body.has_pending() {
                match tokio::time::timeout(stream_idle, req_body.read_ahead()).await {
                    Ok(r) => r.map_err(|e| ForwardError::downstream(&e))?,
                    Err(_) => return Err(ForwardError::StreamIdle(stream_idle)),
                }
            }
            Ok::<(), ForwardError>(())
        }
        .await;
        if let Err(e) = ahead {
            let (status, flags, msg) = e.reply();
            return rec.local(reply(
                status,
                msg,
                flags,
                cluster.no_endpoint_labels.clone(),
            ));
        }
    }

    if let Some(body) = &replay {
        for m in &policy.mirrors {
            if roll(m.per_million, &mut rand::rng()) {
                mirror(shared, &m.cluster, parts, body, policy.timeout, plan.use_h2);
            }
        }
    } else if !policy.mirrors.is_empty() {
        tracing::debug!("request body over the retry buffer: not mirrored");
    }

    if plan.upgrade {
        let Some(idx) = cluster.pick(plan.hash, &[]) else {
            return rec.local(no_healthy_upstream(cluster));
        };
        let endpoint = cluster.endpoints[idx].clone();
        rec.set_upstream_host(&endpoint.addr_str);
        let active = ActiveGuard::with_cluster(&endpoint, &cluster.state, None);
        if set_upstream_uri(parts, &endpoint).is_err() {
            return rec.local(reply(
                StatusCode::BAD_REQUEST,
                "bad path",
                Flags::DownstreamProtocolError,
                endpoint.labels.clone(),
            ));
        }
        let parts = std::mem::replace(parts, empty_head());
        let sent = send_upgrade(shared, &endpoint.pool, parts, req_body, downstream_upgrade).await;
        return respond(
            &plan,
            downstream_version,
            shared,
            rec,
            sent,
            &endpoint,
            active,
        );
    }

    let deadline = policy.timeout.map(|t| Instant::now() + t);
    let retry: Option<&RetryPolicy> = policy.retry.as_ref().filter(|r| r.attempts > 0);
    let avoid_tried = retry.is_some_and(|r| r.avoid_previous_hosts) && !cluster.lb.is_hash();
    let retriable_headers = retry
        .filter(|r| r.on.has(RetryOn::HEADERS))
        .and_then(|_| parts.headers.get("x-envoy-retriable-header-names").cloned());
    // The upstream's response headers can be left as it sent them, for the
    // lean path to write out, when nothing here adds to or reads them:
    // route response headers, CORS, a hash cookie, retry on named headers,
    // gRPC (its status is read from them). The rest (a 101, headers a
    // retry policy looks for) `h1::parse_head_as` keeps in a map itself.
    let raw = rec.raw_response()
        && plan.route.response_ops.is_empty()
        && plan.cors_origin.is_none()
        && plan.set_cookie.is_none()
        && retriable_headers.is_none()
        && !plan.grpc;
    // The head stays here: an HTTP/1.1 try borrows it (its bytes are
    // written from it), an HTTP/2 try takes a copy unless it is the last.
    let mut head: Option<&mut http::request::Parts> = Some(parts);
    let mut body_once = Some(req_body);
    // Endpoints tried so far (the first few: enough to steer retries away).
    let mut tried = [0usize; 8];
    let mut n_tried = 0;
    let mut retries = 0u32;
    // Held from a retry's backoff through its try: the cluster's retries in flight.
    let mut retrying: Option<RetryGuard> = None;
    loop {
        let last = match (retry, &replay) {
            (Some(r), Some(_)) => retries >= r.attempts,
            _ => true,
        };
        let b = match (&replay, body_once.take()) {
            (Some(r), _) => ReqBody::replay(r),
            (None, Some(b)) => b,
            (None, None) => break,
        };
        let p = match head.as_deref_mut() {
            Some(h) if !plan.use_h2 || !last => Head::Lent(h),
            Some(_) => match head.take() {
                Some(h) => Head::Owned(std::mem::replace(h, empty_head())),
                None => break,
            },
            None => break,
        };
        let per_try = retry.and_then(|r| r.per_try_timeout);
        // When this try must be over: the per-try timeout within the route's.
        let until = match (per_try, deadline) {
            (None, d) => d,
            (Some(t), d) => {
                let p = Instant::now() + t;
                Some(d.map_or(p, |d| d.min(p)))
            }
        };
        let at_deadline = |d: Option<Instant>| d.is_some_and(|d| Instant::now() >= d);
        let exclude: &[usize] = if avoid_tried { &tried[..n_tried] } else { &[] };
        let bounds = Bounds {
            raw,
            added: added.as_ref(),
            until,
            route: deadline,
        };
        let outcome = try_once(shared, &plan, p, b, exclude, bounds, &mut rec).await;
        let (idx, tried_result) = outcome;
        drop(retrying.take());
        if let Some(i) = idx
            && avoid_tried
            && n_tried < tried.len()
        {
            tried[n_tried] = i;
            n_tried += 1;
        }
        // What happened, and is it worth another try?
        let retriable = match &tried_result {
            Tried::Response(resp, _) => retry.is_some_and(|r| {
                r.retriable_response(resp.status(), resp.headers(), retriable_headers.as_ref())
            }),
            Tried::Failed(e, _) => retry.is_some_and(|r| r.retriable_failure(TryFailure::of(e))),
            Tried::TimedOut(_) => {
                !at_deadline(deadline)
                    && retry.is_some_and(|r| r.retriable_failure(TryFailure::Timeout))
            }
            Tried::NoEndpoint | Tried::Overflow => false,
        };
        let can_retry = retriable && !last && !at_deadline(deadline);
        if can_retry && cluster.retry_allowed() {
            retries += 1;
            let wait = retry.map_or(Duration::ZERO, |r| r.backoff(retries - 1, &mut rand::rng()));
            drop(tried_result);
            if let Some(d) = deadline
                && Instant::now() + wait >= d
            {
                tokio::time::sleep_until(d).await;
                return rec.local(upstream_timeout(cluster.no_endpoint_labels.clone()));
            }
            let _ = retrying.replace(RetryGuard::new(cluster));
            tokio::time::sleep(wait).await;
            continue;
        }
        // The retry budget or maxRetries was full: UO; retries used up: URX.
        let overflowed = can_retry;
        let exhausted = !can_retry && retriable && retries > 0;
        let flag = |own: Flags| {
            if overflowed {
                Some(Flags::UpstreamOverflow)
            } else if exhausted {
                Some(own.retries_exhausted())
            } else {
                None
            }
        };
        // The request head is done with: its map goes back for reuse.
        if let Some(h) = head.take() {
            crate::http::headers::recycle(std::mem::take(&mut h.headers));
        }
        return match tried_result {
            Tried::Response(resp, a) => {
                if let Some(f) = flag(Flags::None) {
                    rec.set_flags(f);
                }
                respond(
                    &plan,
                    downstream_version,
                    shared,
                    rec,
                    Ok(resp),
                    a.endpoint,
                    a.active,
                )
            }
            Tried::Failed(e, a) => {
                let (status, flags, msg) = e.reply();
                tracing::debug!(cluster = %cluster.name, endpoint = %a.endpoint.addr, error = %e, %flags, "upstream request failed");
                rec.local_with(
                    reply(
                        status,
                        msg,
                        flag(flags).unwrap_or(flags),
                        a.endpoint.labels.clone(),
                    ),
                    Some(a.active),
                )
            }
            Tried::TimedOut(a) => {
                let mut r = upstream_timeout(a.endpoint.labels.clone());
                if let Some(f) = flag(Flags::UpstreamRequestTimeout) {
                    r.flags = f;
                }
                rec.local_with(r, Some(a.active))
            }
            Tried::NoEndpoint => rec.local(no_healthy_upstream(cluster)),
            Tried::Overflow => rec.local(overflow(cluster.no_endpoint_labels.clone())),
        };
    }
    rec.local(no_healthy_upstream(cluster))
}

/// When a try must have its response head (`until`: the per-try timeout
/// within the route's) and when the whole response must be over (`route`);
/// and whether an HTTP/1.1 upstream's headers may be left raw (`raw`).
#[derive(Clone, Copy)]
struct Bounds<'a> {
    raw: bool,
    /// Headers for an HTTP/1.1 try to write that are not in the map.
    added: Option<&'a h1::Added<'a>>,
    until: Option<Instant>,
    route: Option<Instant>,
}

/// A request waiting for a `maxConnections` slot, counted against
/// `http1MaxPendingRequests` while it waits (also when it is cancelled).
struct PendingGuard(Arc<crate::cluster::ClusterState>);

impl PendingGuard {
    /// `None` when the pending queue is full.
    fn enter(c: &Cluster) -> Option<Self> {
        let max = c.limits.max_pending as usize;
        if c.state.pending.fetch_add(1, Ordering::Relaxed) >= max && max > 0 {
            c.state.pending.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(PendingGuard(c.state.clone()))
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a retry in flight against the cluster's retry budget.
struct RetryGuard(Arc<crate::cluster::ClusterState>);

impl RetryGuard {
    fn new(c: &Cluster) -> Self {
        c.state.active_retries.fetch_add(1, Ordering::Relaxed);
        RetryGuard(c.state.clone())
    }
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.active_retries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One try: pick an endpoint, take a connection slot, send by `until`, and
/// report the outcome to outlier detection.
async fn try_once<'s>(
    shared: &Arc<Shared>,
    plan: &Plan<'s>,
    mut head: Head<'_>,
    body: ReqBody,
    exclude: &[usize],
    bounds: Bounds<'_>,
    rec: &mut Recorder,
) -> (Option<usize>, Tried<'s>) {
    let until = bounds.until;
    let cluster = plan.cluster;
    let remote = plan
        .action
        .policy
        .retry
        .as_ref()
        .is_some_and(|r| r.remote_localities);
    let Some(idx) = cluster.pick_retry(plan.hash, exclude, remote) else {
        return (None, Tried::NoEndpoint);
    };
    let endpoint: &'s Endpoint = &cluster.endpoints[idx];
    rec.set_upstream_host(&endpoint.addr_str);
    // connectionPool.tcp.maxConnections / http1MaxPendingRequests: an
    // HTTP/1.1 request holds a connection slot; without one it waits as
    // pending, unless the pending queue is full too.
    let slot = match &cluster.conn_slots {
        Some(s) if !plan.use_h2 => match s.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let Some(_pending) = PendingGuard::enter(cluster) else {
                    return (None, Tried::Overflow);
                };
                // Waits for a slot as long as the try may last (Envoy: until
                // the route timeout), then it is the try's timeout.
                let got = match until {
                    Some(by) => tokio::time::timeout_at(by, s.clone().acquire_owned())
                        .await
                        .ok(),
                    None => Some(s.clone().acquire_owned().await),
                };
                match got {
                    Some(Ok(p)) => Some(p),
                    Some(Err(_)) => return (None, Tried::Overflow),
                    None => {
                        let active = ActiveGuard::with_cluster(endpoint, &cluster.state, None);
                        return (Some(idx), Tried::TimedOut(Attempt { endpoint, active }));
                    }
                }
            }
        },
        _ => None,
    };
    let active = ActiveGuard::with_cluster(endpoint, &cluster.state, slot);
    // HTTP/1.1 writes only the path; hyper's HTTP/2 client needs the whole URI.
    if plan.use_h2 && set_upstream_uri(head.parts_mut(), endpoint).is_err() {
        let a = Attempt { endpoint, active };
        return (
            Some(idx),
            Tried::Failed(ForwardError::UpstreamProtocol("bad upstream URI"), a),
        );
    }
    // HTTP/1.1 folds `until` into the timers it sets anyway (one per wait);
    // HTTP/2 gets a timer of its own.
    let sending = send(shared, endpoint, plan.use_h2, head, body, bounds);
    let sent = if plan.use_h2 {
        // Until the response head: the try's deadline, or the stream idle timeout.
        let idle = shared.limits.stream_idle_timeout;
        let (at, expired) = match until {
            Some(u) if u < Instant::now() + idle => (u, ForwardError::TryTimeout),
            _ => (Instant::now() + idle, ForwardError::StreamIdle(idle)),
        };
        tokio::time::timeout_at(at, sending)
            .await
            .unwrap_or(Err(expired))
    } else {
        sending.await
    };
    let a = Attempt { endpoint, active };
    match sent {
        Err(ForwardError::TryTimeout) => {
            cluster.report(idx, Outcome::LocalFailure);
            (Some(idx), Tried::TimedOut(a))
        }
        Ok(resp) => {
            cluster.report(idx, Outcome::Status(resp.status().as_u16()));
            (Some(idx), Tried::Response(resp, a))
        }
        Err(e) => {
            if !matches!(
                e,
                ForwardError::DownstreamBody(_)
                    | ForwardError::DownstreamGone(_)
                    | ForwardError::DownstreamStalled(_)
            ) {
                cluster.report(idx, Outcome::LocalFailure);
            }
            (Some(idx), Tried::Failed(e, a))
        }
    }
}

async fn send(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    use_h2: bool,
    head: Head<'_>,
    body: ReqBody,
    bounds: Bounds<'_>,
) -> Result<Response<RespKind>, ForwardError> {
    let Bounds {
        raw,
        added,
        until,
        route: route_deadline,
    } = bounds;
    if use_h2 {
        let parts = match head {
            Head::Lent(p) => copy_head(p),
            Head::Owned(p) => p,
        };
        let resp = send_h2(&endpoint.pool, parts, body).await?;
        // The route timeout bounds the body too.
        Ok(match route_deadline {
            Some(d) => resp.map(|k| match k {
                RespKind::Upstream(b) => {
                    RespKind::Bounded(b, Box::pin(tokio::time::sleep_until(d)))
                }
                other => other,
            }),
            None => resp,
        })
    } else {
        let parts: &http::request::Parts = match &head {
            Head::Lent(p) => p,
            Head::Owned(p) => p,
        };
        let t = h1::Timeouts {
            stream_idle: shared.limits.stream_idle_timeout,
            deadline: until,
            response_deadline: route_deadline,
        };
        let pool = &endpoint.pool;
        h1::send(
            pool.h1(),
            || pool.connect(Alpn::Http1),
            parts,
            body,
            t,
            raw,
            added,
        )
        .await
        .map(|r| r.map(RespKind::H1))
    }
}

/// The upstream response (or failure) as the downstream response.
fn respond(
    plan: &Plan<'_>,
    downstream_version: Version,
    shared: &Arc<Shared>,
    rec: Recorder,
    sent: Result<Response<RespKind>, ForwardError>,
    endpoint: &Endpoint,
    active: ActiveGuard,
) -> Response<RespBody> {
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            let (status, flags, msg) = e.reply();
            tracing::debug!(cluster = %plan.cluster.name, endpoint = %endpoint.addr, error = %e, %flags, "upstream request failed");
            return rec.local_with(
                reply(status, msg, flags, endpoint.labels.clone()),
                Some(active),
            );
        }
    };
    let (mut parts, kind) = resp.into_parts();
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(&mut parts.headers, false);
        parts.version = downstream_version;
    }
    plan.route.response_ops.apply(&mut parts.headers);
    if let (Some(origin), Some(cors)) = (&plan.cors_origin, &plan.action.policy.cors) {
        cors.response_headers(origin, &mut parts.headers);
    }
    if let Some(c) = &plan.set_cookie {
        parts.headers.append(header::SET_COOKIE, c.clone());
    }
    if shared.drain.is_draining() && downstream_version == Version::HTTP_11 {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    rec.upstream(parts, kind, endpoint.labels.clone(), active)
}

/// Envoy's shadow host: `-shadow` after the host, before any port
/// (`a:8080` → `a-shadow:8080`, `[::1]:80` → `[::1]-shadow:80`).
fn shadow_host(host: &str) -> String {
    let split = match host.find(']') {
        Some(end) => end + 1,
        None => host.rfind(':').unwrap_or(host.len()),
    };
    let (h, port) = host.split_at(split);
    format!("{h}-shadow{port}")
}

/// Sends a copy of the request to a mirror cluster, with `-shadow` after
/// the host (Istio before 1.28, Envoy's default), and throws the answer
/// away. Its own task: it never delays or fails the request it copies.
fn mirror(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    parts: &http::request::Parts,
    body: &Replay,
    timeout: Option<Duration>,
    use_h2: bool,
) {
    let Some(idx) = cluster.pick(None, &[]) else {
        return;
    };
    let endpoint = cluster.endpoints[idx].clone();
    let mut p = copy_head(parts);
    if let Some(host) = p.headers.get(header::HOST).and_then(|h| h.to_str().ok())
        && let Ok(v) = HeaderValue::try_from(shadow_host(host))
    {
        p.headers.insert(header::HOST, v);
    }
    let use_h2 = use_h2 || cluster.protocol == crate::cluster::UpstreamProtocol::Http2;
    p.version = if use_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    if set_upstream_uri(&mut p, &endpoint).is_err() {
        return;
    }
    let b = ReqBody::replay(body);
    let shared = shared.clone();
    let cluster = cluster.clone();
    let limit = timeout.unwrap_or(shared.limits.stream_idle_timeout);
    tokio::spawn(async move {
        let _active = ActiveGuard::with_cluster(&endpoint, &cluster.state, None);
        let work = async {
            let bounds = Bounds {
                raw: false,
                added: None,
                until: None,
                route: None,
            };
            let resp = send(&shared, &endpoint, use_h2, Head::Owned(p), b, bounds).await?;
            // Read the answer to its end, so the connection can be reused.
            use http_body_util::BodyExt;
            let body = RespBody {
                kind: resp.into_body(),
                exchange: None,
                inflight: None,
            };
            let _ = body.collect().await;
            Ok::<(), ForwardError>(())
        };
        match tokio::time::timeout(limit, work).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(cluster = %cluster.name, error = %e, "mirror failed"),
            Err(_) => tracing::debug!(cluster = %cluster.name, "mirror timed out"),
        }
    });
}

async fn send_h2(
    pool: &crate::pool::Pool,
    parts: http::request::Parts,
    body: ReqBody,
) -> Result<Response<RespKind>, ForwardError> {
    let mut tx = pool.h2().await?;
    tx.ready().await?;
    let resp = tx.send_request(Request::from_parts(parts, body)).await?;
    Ok(resp.map(RespKind::Upstream))
}

/// An HTTP/1.1 upgrade (WebSocket): a fresh connection, never pooled; once
/// both sides switch, bytes are copied both ways in a tracked task.
async fn send_upgrade(
    shared: &Arc<Shared>,
    pool: &crate::pool::Pool,
    parts: http::request::Parts,
    body: ReqBody,
    downstream: Option<OnUpgrade>,
) -> Result<Response<RespKind>, ForwardError> {
    let stream = pool.connect(Alpn::Http1).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = tx.send_request(Request::from_parts(parts, body)).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(down) = downstream
    {
        let up = hyper::upgrade::on(&mut resp);
        let tracked = shared.drain.track();
        tokio::spawn(async move {
            let _tracked = tracked;
            match tokio::try_join!(down, up) {
                Ok((d, u)) => {
                    let mut d = TokioIo::new(d);
                    let mut u = TokioIo::new(u);
                    let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
    Ok(resp.map(RespKind::Upstream))
}

#[cfg(test)]
mod tests {
    use super::shadow_host;

    #[test]
    fn shadow_hosts() {
        assert_eq!(shadow_host("a.b:8080"), "a.b-shadow:8080");
        assert_eq!(shadow_host("a.b"), "a.b-shadow");
        assert_eq!(shadow_host("[::1]:80"), "[::1]-shadow:80");
        assert_eq!(shadow_host("[::1]"), "[::1]-shadow");
    }
}
