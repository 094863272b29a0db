//! The HTTP/1.1 client, inside the request's own task, generic over the
//! connection's stream (plain TCP today, TLS next).
//!
//! hyper's pooled client runs each upstream connection as a separate task
//! and hands requests to it over channels; for a proxy that is a task hop
//! and a pool lock per request. Here the request task checks a connection
//! out of the endpoint's idle list, writes the request, parses the response
//! head with `httparse`, and the response body reads the same socket while
//! hyper's server streams it downstream. When the body ends cleanly the
//! connection goes back to the idle list (LIFO, idle limit).
//!
//! A connection is only reused when nothing is waiting on it: a pooled
//! connection is probed before every use, and one with unread bytes (an
//! upstream that wrote a response nobody asked for) or at EOF is closed.
//! Without the probe, a stray response would be read as the answer to the
//! next request, and every later response on that connection would go to
//! the wrong client.
//!
//! A request that meets a reused connection the upstream already closed (EOF
//! or reset before any response byte) is sent again once on a new connection,
//! when its body is empty and so can be replayed (Istio's 503 UC,
//! istio/istio#13205).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::error::{ConnectError, ForwardError};

const MAX_HEAD: usize = 64 * 1024;
const MAX_IDLE_PER_ENDPOINT: usize = 1024;
/// Response headers: as many as Envoy accepts by default.
const MAX_RESPONSE_HEADERS: usize = 100;
// `parse_head` marks hop-by-hop headers in a 128-bit mask.
const _: () = assert!(MAX_RESPONSE_HEADERS <= 128);

/// An open connection to one endpoint, with what was read past the last message.
pub struct Conn<S> {
    stream: S,
    buf: BytesMut,
    since: Instant,
    opened: Instant,
    served: u32,
    /// The timer bounding the wait for a response head, kept across the
    /// connection's requests (see [`read_head_bounded`]).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Conn<S> {
    pub fn new(stream: S) -> Self {
        let now = Instant::now();
        Conn {
            stream,
            buf: BytesMut::new(),
            since: now,
            opened: now,
            served: 0,
            timer: None,
        }
    }
}

/// When a kept-alive connection is no longer reused.
#[derive(Debug, Clone, Copy)]
pub struct Reuse {
    /// Unused for this long: closed.
    pub idle_timeout: Duration,
    /// This many responses: closed (`maxRequestsPerConnection`); 0: no limit.
    pub max_requests: u32,
    /// Open this long: closed (`maxConnectionDuration`).
    pub max_age: Option<Duration>,
}

/// Idle keep-alive connections of one pool key (endpoint + transport).
pub struct Idle<S> {
    conns: Mutex<Vec<Conn<S>>>,
    reuse: Reuse,
}

impl<S> std::fmt::Debug for Idle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.conns.lock().map(|c| c.len()).unwrap_or(0);
        write!(f, "Idle({n})")
    }
}

impl<S: Peek> Idle<S> {
    /// The most recently used connection that is still fresh and clean
    /// (ages reckoned at `now`).
    fn checkout(&self, now: Instant) -> Option<Conn<S>> {
        loop {
            let mut c = {
                let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
                conns.pop()?
            };
            if now.saturating_duration_since(c.since) >= self.reuse.idle_timeout
                || self
                    .reuse
                    .max_age
                    .is_some_and(|a| now.saturating_duration_since(c.opened) >= a)
            {
                continue;
            }
            match probe(&mut c) {
                Probe::Idle => return Some(c),
                Probe::Stray => {
                    tracing::debug!("upstream wrote bytes nobody asked for; closing the connection")
                }
                Probe::Closed => {}
            }
        }
    }
}

impl<S: AsyncRead + Unpin> Idle<S> {
    pub fn new(reuse: Reuse) -> Self {
        Idle {
            conns: Mutex::new(Vec::new()),
            reuse,
        }
    }

    /// Puts `c` back, idle since `since` (no later than its response ended:
    /// an earlier instant only retires it sooner).
    fn checkin(&self, mut c: Conn<S>, since: Instant) {
        c.since = since;
        c.served += 1;
        if self.reuse.max_requests > 0 && c.served >= self.reuse.max_requests {
            return;
        }
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.len() < MAX_IDLE_PER_ENDPOINT {
            conns.push(c);
        }
    }
}

enum Probe {
    /// Nothing to read: usable.
    Idle,
    /// Bytes arrived while no request was outstanding.
    Stray,
    /// EOF or an error.
    Closed,
}

/// A stream a pooled connection is looked at through before it is reused.
pub trait Peek: AsyncRead + Unpin {
    /// Reads what is there without waiting: `Pending` when nothing is.
    fn peek_idle(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>>;
}

/// A `peek_idle` for any stream: a read polled with a waker that does
/// nothing (it stays registered with the stream until the next read
/// replaces it).
pub fn peek_by_poll<S: AsyncRead + Unpin + ?Sized>(
    s: &mut S,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    let mut rb = ReadBuf::new(buf);
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    match Pin::new(s).poll_read(&mut cx, &mut rb) {
        Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// Looks at an idle connection without waiting: readable means it is not
/// usable (EOF, reset, or bytes no request asked for).
fn probe<S: Peek>(c: &mut Conn<S>) -> Probe {
    if !c.buf.is_empty() {
        return Probe::Stray;
    }
    let mut byte = [0u8; 1];
    match c.stream.peek_idle(&mut byte) {
        Poll::Pending => Probe::Idle,
        Poll::Ready(Ok(0) | Err(_)) => Probe::Closed,
        Poll::Ready(Ok(_)) => Probe::Stray,
    }
}

enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

/// A buffer for one request head, lent by the thread and given back when
/// dropped: no allocation per request once a thread has one.
struct HeadBuf(Vec<u8>);

/// A head buffer grown past this by one request is not kept.
const HEAD_BUF_KEEP: usize = 8 * 1024;

thread_local! {
    static HEAD_BUFS: crate::freelist::FreeList<Vec<u8>> =
        const { crate::freelist::FreeList::new(64) };
}

impl HeadBuf {
    fn take() -> Self {
        HeadBuf(
            HEAD_BUFS
                .with(crate::freelist::FreeList::take)
                .unwrap_or_else(|| Vec::with_capacity(512)),
        )
    }
}

impl Drop for HeadBuf {
    fn drop(&mut self) {
        let mut b = std::mem::take(&mut self.0);
        // A head grown large by one request is not kept.
        if b.capacity() > HEAD_BUF_KEEP {
            return;
        }
        b.clear();
        HEAD_BUFS.with(|l| l.give(b));
    }
}

/// Headers forwarding sets on a request, written into the head instead of
/// put into the request's map (when nothing reads the map after
/// forwarding: see `forward`). `host` and `xff` take the place of the
/// map's `Host` and `x-forwarded-for`; `xfp` and `rid` are set only when
/// the request had none.
#[derive(Default)]
pub struct Added<'a> {
    /// Borrowed from the plan: cloned only into a map.
    pub host: Option<&'a HeaderValue>,
    pub xff: Option<HeaderValue>,
    pub xfp: Option<&'static str>,
    pub rid: Option<crate::http::headers::RequestId>,
}

impl Added<'_> {
    /// Into the request's map instead, for a request whose map is read
    /// after forwarding: each replaces what the map held under its name.
    pub fn insert_into(self, h: &mut HeaderMap) {
        use crate::http::headers::{X_FORWARDED_FOR, X_FORWARDED_PROTO, X_REQUEST_ID};
        if let Some(v) = self.host {
            h.insert(header::HOST, v.clone());
        }
        if let Some(v) = self.xff {
            h.insert(X_FORWARDED_FOR, v);
        }
        if let Some(p) = self.xfp {
            h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(p));
        }
        if let Some(v) = self.rid {
            h.insert(X_REQUEST_ID, v.to_value());
        }
    }
}

fn encode_head(
    parts: &http::request::Parts,
    added: Option<&Added<'_>>,
    framing: &Framing,
    b: &mut Vec<u8>,
) {
    b.extend_from_slice(parts.method.as_str().as_bytes());
    b.push(b' ');
    b.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    b.extend_from_slice(b" HTTP/1.1\r\n");
    let none = Added::default();
    let a = added.unwrap_or(&none);
    // Host first, as nginx and Envoy write it; the map's Host and
    // x-forwarded-for (all of their values) give way to those set here.
    if let Some(h) = &a.host {
        crate::http::headers::write_header(b, b"host", h.as_bytes());
    }
    let (own_host, own_xff) = (a.host.is_some(), a.xff.is_some());
    for (k, v) in &parts.headers {
        if (k == header::CONTENT_LENGTH && !matches!(framing, Framing::Length(_)))
            || (own_host && k == header::HOST)
            || (own_xff && k == crate::http::headers::X_FORWARDED_FOR)
        {
            continue;
        }
        crate::http::headers::write_header(b, k.as_str().as_bytes(), v.as_bytes());
    }
    if let Some(x) = &a.xff {
        crate::http::headers::write_header(b, b"x-forwarded-for", x.as_bytes());
    }
    if let Some(p) = a.xfp {
        crate::http::headers::write_header(b, b"x-forwarded-proto", p.as_bytes());
    }
    if let Some(r) = &a.rid {
        crate::http::headers::write_header(b, b"x-request-id", r.as_bytes());
    }
    match framing {
        Framing::Chunked => b.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length(n) if !parts.headers.contains_key(header::CONTENT_LENGTH) => {
            b.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        Framing::Empty
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
                && !parts.headers.contains_key(header::CONTENT_LENGTH) =>
        {
            b.extend_from_slice(b"content-length: 0\r\n");
        }
        _ => {}
    }
    b.extend_from_slice(b"\r\n");
}

/// How long the upstream may stay silent (Envoy's stream idle timeout), and
/// when the try must be over (the route's or the per-try timeout). One
/// timer bounds each wait by whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub stream_idle: Duration,
    pub deadline: Option<tokio::time::Instant>,
    /// The route timeout: it bounds the response body too (Envoy's route
    /// timeout ends with the response).
    pub response_deadline: Option<tokio::time::Instant>,
}

/// The route timeout expired while the response body was being read.
#[derive(Debug)]
pub struct RouteTimeout;

impl std::fmt::Display for RouteTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream request timeout")
    }
}

impl std::error::Error for RouteTimeout {}

impl Timeouts {
    /// Until when the next wait may last, and the error when it expires.
    fn bound(&self) -> (tokio::time::Instant, ForwardError) {
        self.bound_at(tokio::time::Instant::now())
    }

    /// As `bound`, reckoned from `now`.
    fn bound_at(&self, now: tokio::time::Instant) -> (tokio::time::Instant, ForwardError) {
        let idle = now + self.stream_idle;
        match self.deadline {
            Some(d) if d < idle => (d, ForwardError::TryTimeout),
            _ => (idle, ForwardError::StreamIdle(self.stream_idle)),
        }
    }

    async fn run<T>(&self, f: impl Future<Output = T>) -> Result<T, ForwardError> {
        let (at, expired) = self.bound();
        tokio::time::timeout_at(at, f).await.map_err(|_| expired)
    }
}

async fn idle_bounded<T>(
    t: &Timeouts,
    f: impl Future<Output = io::Result<T>>,
) -> Result<T, ForwardError> {
    // A write that the socket takes at once (nearly all) needs no timer.
    let mut f = std::pin::pin!(f);
    if let Some(r) = futures_util::FutureExt::now_or_never(f.as_mut()) {
        return r.map_err(ForwardError::Reset);
    }
    t.run(f).await?.map_err(ForwardError::Reset)
}

/// Sends one request over a pooled HTTP/1.1 connection (`connect` opens a
/// new one when the pool has none).
pub async fn send<S, B, C, F>(
    idle: &Arc<Idle<S>>,
    connect: C,
    parts: &http::request::Parts,
    mut body: B,
    t: Timeouts,
    raw: bool,
    added: Option<&Added<'_>>,
) -> Result<Response<H1Body<S>>, ForwardError>
where
    S: Peek + AsyncWrite,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
    C: Fn() -> F,
    F: Future<Output = Result<S, ConnectError>>,
{
    let framing = if body.is_end_stream() {
        Framing::Empty
    } else {
        match body.size_hint().exact() {
            Some(n) => Framing::Length(n),
            None => Framing::Chunked,
        }
    };
    let replayable = matches!(framing, Framing::Empty);
    let mut head = HeadBuf::take();
    encode_head(parts, added, &framing, &mut head.0);
    // A small body goes with its head, in one write, as far as it is
    // already there (a body read with its head, or arrived since); the
    // rest is written after the head as it comes.
    if let Framing::Length(n) = framing
        && head.0.len() as u64 + n <= HEAD_BUF_KEEP as u64
    {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        head.0.extend_from_slice(&d);
                    }
                }
                Poll::Ready(Some(Err(e))) => return Err(ForwardError::downstream(&e)),
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
    }
    let head_request = parts.method == Method::HEAD;
    let mut reused_failed = false;
    loop {
        // One clock read for the common try (a pooled connection, a head
        // and no body): the pool's age checks, the response head's deadline
        // and, when the whole response comes with its head, the
        // connection's idle start (early by the upstream's response time:
        // it is retired that much sooner, never later).
        let mut now = Instant::now();
        let idle_conn = if reused_failed {
            None
        } else {
            idle.checkout(now)
        };
        let (mut conn, reused) = match idle_conn {
            Some(c) => (c, true),
            None => {
                let opened = match t.deadline {
                    Some(d) => tokio::time::timeout_at(d, connect())
                        .await
                        .map_err(|_| ForwardError::TryTimeout)??,
                    None => connect().await?,
                };
                (Conn::new(opened), false)
            }
        };
        if let Err(e) = idle_bounded(&t, conn.stream.write_all(&head.0)).await {
            if reused && replayable && !reused_failed {
                reused_failed = true;
                continue;
            }
            return Err(e);
        }
        if !replayable {
            // On any error the connection is dropped here, closed, never
            // reused: the upstream holds half a request.
            write_body(&mut conn, &mut body, &framing, t).await?;
        }
        if !reused || !replayable {
            // A connect or a body took time: the head's deadline starts now.
            now = Instant::now();
        }
        match read_head_bounded(&mut conn, head_request, raw, &t, now.into()).await {
            Err(e) => return Err(e),
            Ok(Ok(Head {
                response: resp,
                state,
                keep_alive,
                raw,
            })) => {
                let mut body = H1Body {
                    conn: Some(conn),
                    state,
                    keep_alive,
                    raw,
                    idle: idle.clone(),
                    stream_idle: t.stream_idle,
                    response_deadline: t.response_deadline,
                    timer: None,
                    began: Some(now),
                };
                if matches!(body.state, State::Done) {
                    body.finish_at(now);
                }
                return Ok(resp.map(|()| body));
            }
            Ok(Err(HeadError::Io {
                nothing_read: true, ..
            })) if reused && replayable && !reused_failed => {
                tracing::debug!("kept-alive connection closed by upstream; retrying on a new one");
                reused_failed = true;
            }
            Ok(Err(HeadError::Io { error, .. })) => return Err(ForwardError::Reset(error)),
            Ok(Err(HeadError::Malformed(m))) => return Err(ForwardError::UpstreamProtocol(m)),
        }
    }
}

async fn write_body<S, B>(
    conn: &mut Conn<S>,
    body: &mut B,
    framing: &Framing,
    t: Timeouts,
) -> Result<(), ForwardError>
where
    S: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
{
    let chunked = matches!(framing, Framing::Chunked);
    let limit = &t;
    loop {
        // Waiting for the client: its silence is not the upstream's failure.
        let frame = match t.run(body.frame()).await {
            Err(_) => return Err(ForwardError::DownstreamStalled(t.stream_idle)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ForwardError::downstream(&e)),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            let size = format!("{:x}\r\n", data.len());
            idle_bounded(limit, conn.stream.write_all(size.as_bytes())).await?;
            idle_bounded(limit, conn.stream.write_all(&data)).await?;
            idle_bounded(limit, conn.stream.write_all(b"\r\n")).await?;
        } else {
            idle_bounded(limit, conn.stream.write_all(&data)).await?;
        }
    }
    if chunked {
        idle_bounded(limit, conn.stream.write_all(b"0\r\n\r\n")).await?;
    }
    Ok(())
}

enum HeadError {
    Io {
        error: io::Error,
        nothing_read: bool,
    },
    Malformed(&'static str),
}

/// A parsed response head: the response, how its body is framed, and
/// whether the upstream allows the connection to be reused. With `raw`,
/// the response's map is empty and the upstream's headers are there.
pub struct Head {
    pub response: Response<()>,
    pub state: State,
    pub keep_alive: bool,
    pub raw: Option<RawHeaders>,
}

/// A response head's headers as the upstream sent them, for a downstream
/// that writes them straight out (the lean HTTP/1.1 path): no map is built
/// (for each header a name lookup, a hash, an insert, and later a clear).
/// Hop-by-hop headers are not among them. Names and values were checked by
/// httparse, whose token and field-value rules are `http`'s: what a map
/// would refuse, httparse refused first.
///
/// Boxed, from a per-thread free list: the body that carries it is moved
/// several times on its way out, and a pointer moves cheaper than the
/// spans' vector and the head's bytes.
pub struct RawHeaders(Box<RawInner>);

#[derive(Default)]
struct RawInner {
    head: Bytes,
    /// Name and value of each header, as offsets into `head`.
    spans: Vec<[u32; 4]>,
    length: Option<u64>,
    date: bool,
}

thread_local! {
    static RAWS: crate::freelist::FreeList<Box<RawInner>> =
        const { crate::freelist::FreeList::new(64) };
}

impl RawHeaders {
    /// Names (as sent: the writer lowercases them) and values.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let r = &*self.0;
        r.spans.iter().map(|&[n0, n1, v0, v1]| {
            (
                &r.head[n0 as usize..n1 as usize],
                &r.head[v0 as usize..v1 as usize],
            )
        })
    }

    /// The Content-Length the upstream sent (checked: one value, digits).
    pub fn content_length(&self) -> Option<u64> {
        self.0.length
    }

    /// A Date header is among them.
    pub fn has_date(&self) -> bool {
        self.0.date
    }

    /// Done with: the box and its span list go back for the next head.
    pub fn recycle(self) {
        give_raw(self.0);
    }
}

fn give_raw(mut r: Box<RawInner>) {
    if r.spans.capacity() <= 32 {
        r.spans.clear();
        r.head = Bytes::new();
        RAWS.with(|l| l.give(r));
    }
}

/// Parses one response head at the start of `buf` and takes it out of the
/// buffer (pure: no I/O; header values share the head's bytes, no copy).
/// `Ok(None)`: more bytes are needed. 1xx heads are returned like any other
/// (the caller skips them).
pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, &'static str> {
    parse_head_as(buf, head_request, false)
}

/// As `parse_head`; with `raw`, the headers are left as `RawHeaders` when
/// nothing about them needs a map: not a 101, no Connection header naming
/// other headers (those are stripped by name later), and no `grpc-status`
/// or `x-envoy-ratelimited`, which retry policies look up.
pub fn parse_head_as(
    buf: &mut BytesMut,
    head_request: bool,
    raw: bool,
) -> Result<Option<Head>, &'static str> {
    use crate::http::headers::{
        connection_names, has_token, header_name, is_hop_by_hop_name, lower_eq,
    };
    // Left uninitialised: httparse fills only what it parses.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut r = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut r,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err("response head too large");
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many response headers"),
        Err(_) => return Err("malformed response head"),
    };
    let code = r.code.unwrap_or(0);
    let version = r.version.unwrap_or(1);
    let status = StatusCode::from_u16(code).map_err(|_| "bad status code")?;
    // Where the names and values are (the head is taken out of the buffer
    // before anything shares its bytes), and what framing needs: read here
    // as bytes, once.
    let base = buf.as_ptr() as usize;
    let n = r.headers.len();
    let mut raw_box = RAWS
        .with(crate::freelist::FreeList::take)
        .unwrap_or_default();
    let spans = &mut raw_box.spans;
    spans.reserve(n);
    // Hop-by-hop headers (RFC 9110 7.6.1) are forwarding's to drop: they
    // are left out here rather than put in and taken out again, unless a
    // Connection header names others (then the whole set is stripped
    // later, names and all) or the response switches protocols.
    let mut hops: u128 = 0;
    let mut names_others = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut looked_up = false;
    let mut close = false;
    let mut last_te: Option<&[u8]> = None;
    let mut length: Result<Option<u64>, &'static str> = Ok(None);
    let mut has_length = false;
    let mut date = false;
    for (i, h) in r.headers.iter().enumerate() {
        let name = h.name.as_bytes();
        let v = h.value;
        let hop = is_hop_by_hop_name(name);
        hops |= u128::from(hop) << i;
        match name.len() {
            10 if hop && lower_eq(name, b"connection") => {
                close |= has_token(v, b"close");
                names_others |= connection_names(v).next().is_some();
            }
            17 if hop && lower_eq(name, b"transfer-encoding") => last_te = Some(v),
            14 if lower_eq(name, b"content-length") => {
                has_length = true;
                length = match (length, parse_length(v)) {
                    (Err(e), _) | (_, Err(e)) => Err(e),
                    (Ok(None), Ok(n)) => Ok(Some(n)),
                    (Ok(Some(m)), Ok(n)) if m == n => Ok(Some(n)),
                    (Ok(Some(_)), Ok(_)) => Err("conflicting content-length"),
                };
            }
            4 if lower_eq(name, b"date") => date = true,
            11 if lower_eq(name, b"grpc-status") => looked_up = true,
            19 if lower_eq(name, b"x-envoy-ratelimited") => looked_up = true,
            _ => {}
        }
        let name = (h.name.as_ptr() as usize - base) as u32;
        let value = (v.as_ptr() as usize - base) as u32;
        spans.push([
            name,
            name + h.name.len() as u32,
            value,
            value + v.len() as u32,
        ]);
    }
    let keep_alive = version == 1 && !close;
    let chunked = match last_te {
        None => false,
        // RFC 9112 6.3: chunked must be the last coding; anything else
        // would be delimited by close, which a reused connection cannot be.
        Some(v) => {
            let last = v.rsplit(|b| *b == b',').next().map(<[u8]>::trim_ascii);
            if !last.is_some_and(|l| l.eq_ignore_ascii_case(b"chunked")) {
                return Err("transfer-encoding without chunked last");
            }
            true
        }
    };
    let length = match length {
        // Envoy refuses both framings in one message (RFC 9112 6.3: a
        // smuggling or response-splitting attempt).
        Ok(Some(_)) | Err(_) if chunked && has_length => {
            return Err("both transfer-encoding and content-length");
        }
        Ok(l) => l,
        Err(e) => return Err(e),
    };
    let state = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        State::Done
    } else if chunked {
        State::Chunked(Chunk::Size)
    } else {
        match length {
            Some(0) => State::Done,
            Some(n) => State::Length(n),
            None => State::UntilClose,
        }
    };
    let head = buf.split_to(len).freeze();
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = Version::HTTP_11;
    if raw && !names_others && !looked_up {
        if hops != 0 {
            let mut i = 0;
            spans.retain(|_| {
                i += 1;
                hops & (1 << (i - 1)) == 0
            });
        }
        raw_box.head = head;
        raw_box.length = length;
        raw_box.date = date;
        return Ok(Some(Head {
            response,
            state,
            keep_alive,
            raw: Some(RawHeaders(raw_box)),
        }));
    }
    // Room for what forwarding keeps and adds (a cookie, `connection:
    // close` on drain) without the map growing, and no more.
    let mut map = crate::http::headers::header_map(n - hops.count_ones() as usize + 2);
    for (i, &[n0, n1, v0, v1]) in spans.iter().enumerate() {
        if !names_others && hops & (1 << i) != 0 {
            continue;
        }
        let name = header_name(&head[n0 as usize..n1 as usize]).map_err(|_| "bad header name")?;
        let v = HeaderValue::from_maybe_shared(head.slice(v0 as usize..v1 as usize))
            .map_err(|_| "bad header value")?;
        map.append(name, v);
    }
    give_raw(raw_box);
    *response.headers_mut() = map;
    Ok(Some(Head {
        response,
        state,
        keep_alive,
        raw: None,
    }))
}

fn parse_length(v: &[u8]) -> Result<u64, &'static str> {
    let s = v.trim_ascii();
    if s.is_empty() {
        return Err("bad content-length");
    }
    s.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return Err("bad content-length");
        }
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or("bad content-length")
    })
}

/// Reads a response head within the try's bounds. The connection keeps one
/// timer for this across its requests: armed no later than this wait's
/// bound, and re-armed only when it fires before the bound (a later
/// request moved the bound on), about once per stream idle timeout. A
/// request so registers and removes no timer of its own. A timer that fires
/// while its connection waits in the pool wakes nobody who minds.
async fn read_head_bounded<S: AsyncRead + Unpin>(
    conn: &mut Conn<S>,
    head_request: bool,
    raw: bool,
    t: &Timeouts,
    now: tokio::time::Instant,
) -> Result<Result<Head, HeadError>, ForwardError> {
    let (at, expired) = t.bound_at(now);
    let mut timer = conn
        .timer
        .take()
        .unwrap_or_else(|| Box::pin(tokio::time::sleep_until(at)));
    if timer.deadline() > at {
        timer.as_mut().reset(at);
    }
    let read = {
        let mut read = std::pin::pin!(read_head(conn, head_request, raw));
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = read.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            loop {
                ready!(timer.as_mut().poll(cx));
                if tokio::time::Instant::now() >= at {
                    return Poll::Ready(None);
                }
                timer.as_mut().reset(at);
            }
        })
        .await
    };
    conn.timer = Some(timer);
    read.ok_or(expired)
}

async fn read_head<S: AsyncRead + Unpin>(
    conn: &mut Conn<S>,
    head_request: bool,
    raw: bool,
) -> Result<Head, HeadError> {
    let mut read_any = !conn.buf.is_empty();
    loop {
        if !conn.buf.is_empty() {
            match parse_head_as(&mut conn.buf, head_request, raw) {
                Ok(Some(h)) => {
                    if h.response.status().is_informational() {
                        // 100 Continue, 103 Early Hints: not forwarded.
                        continue;
                    }
                    return Ok(h);
                }
                Ok(None) => {}
                Err(m) => return Err(HeadError::Malformed(m)),
            }
        }
        conn.buf.reserve(8 * 1024);
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => {
                return Err(HeadError::Io {
                    error: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before the response",
                    ),
                    nothing_read: !read_any,
                });
            }
            Ok(_) => read_any = true,
            Err(e) => {
                return Err(HeadError::Io {
                    error: e,
                    nothing_read: !read_any,
                });
            }
        }
    }
}

pub enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// How the rest of a response body is delimited.
pub enum State {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// One step of body decoding over what is buffered.
pub enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body ended; the bytes after it belong to nobody.
    End,
    /// Nothing decodable is buffered.
    NeedMore,
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Chunk-size lines are short: a longer one is an attack or a broken peer.
const MAX_CHUNK_LINE: usize = 4096;

impl State {
    /// Decodes what `buf` holds (pure: no I/O). `UntilClose` takes all of it.
    pub fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Step> {
        loop {
            match self {
                State::Done => return Ok(Step::End),
                State::Length(rem) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = (*rem).min(buf.len() as u64) as usize;
                    *rem -= n as u64;
                    let data = buf.split_to(n).freeze();
                    if *rem == 0 {
                        *self = State::Done;
                    }
                    return Ok(Step::Data(data));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                State::Chunked(chunk) => match chunk {
                    Chunk::Size => {
                        let Some(i) = find_crlf(buf) else {
                            if buf.len() > MAX_CHUNK_LINE {
                                return Err(invalid("chunk size line too long"));
                            }
                            return Ok(Step::NeedMore);
                        };
                        let line = &buf[..i];
                        let hex = line.split(|b| *b == b';').next().unwrap_or(&[]);
                        let hex = hex.trim_ascii_end();
                        if hex.is_empty()
                            || hex.len() > 16
                            || !hex.iter().all(u8::is_ascii_hexdigit)
                        {
                            return Err(invalid("bad chunk size"));
                        }
                        let size = std::str::from_utf8(hex)
                            .ok()
                            .and_then(|s| u64::from_str_radix(s, 16).ok())
                            .ok_or_else(|| invalid("bad chunk size"))?;
                        buf.advance(i + 2);
                        *chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(rem) => {
                        if buf.is_empty() {
                            return Ok(Step::NeedMore);
                        }
                        let n = (*rem).min(buf.len() as u64) as usize;
                        *rem -= n as u64;
                        if *rem == 0 {
                            *chunk = Chunk::DataEnd;
                        }
                        return Ok(Step::Data(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Step::NeedMore);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(invalid("bad chunk end"));
                        }
                        buf.advance(2);
                        *chunk = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        if buf.starts_with(b"\r\n") {
                            buf.advance(2);
                            *self = State::Done;
                            return Ok(Step::End);
                        }
                        let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            if buf.len() > MAX_HEAD {
                                return Err(invalid("trailers too large"));
                            }
                            return Ok(Step::NeedMore);
                        };
                        let block = buf.split_to(i + 4);
                        let mut trailers = HeaderMap::new();
                        for line in block[..].split(|b| *b == b'\n') {
                            let line = line.strip_suffix(b"\r").unwrap_or(line);
                            if let Some(c) = line.iter().position(|b| *b == b':')
                                && let (Ok(n), Ok(v)) = (
                                    HeaderName::from_bytes(&line[..c]),
                                    HeaderValue::from_bytes(line[c + 1..].trim_ascii()),
                                )
                            {
                                trailers.append(n, v);
                            }
                        }
                        *self = State::Done;
                        return Ok(Step::Trailers(trailers));
                    }
                },
            }
        }
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// A response body read straight from the upstream connection.
pub struct H1Body<S> {
    conn: Option<Conn<S>>,
    state: State,
    /// The upstream allows reuse (HTTP/1.1, no `connection: close`).
    keep_alive: bool,
    idle: Arc<Idle<S>>,
    stream_idle: Duration,
    response_deadline: Option<tokio::time::Instant>,
    /// Armed only when the upstream keeps us waiting.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The upstream's headers, when the response's map was left empty.
    raw: Option<RawHeaders>,
    /// When the try began, until the body is first polled: a body that
    /// ends in that first poll (nearly always there with its head) gives
    /// its connection back as idle from then (early, so retired sooner,
    /// never later) without a clock read.
    began: Option<Instant>,
}

impl<S> H1Body<S> {
    /// The upstream's headers, when `send` was asked for them raw and
    /// nothing about them needed a map (see `parse_head_as`).
    pub fn take_raw_headers(&mut self) -> Option<RawHeaders> {
        self.raw.take()
    }
}

impl<S: AsyncRead + Unpin> H1Body<S> {
    /// The message ended cleanly: the connection goes back to the pool if
    /// the upstream allows it and nothing unexpected follows.
    fn finish(&mut self) {
        self.finish_at(Instant::now());
    }

    /// As `finish`, with the connection idle from `since`.
    fn finish_at(&mut self, since: Instant) {
        self.state = State::Done;
        if let Some(c) = self.conn.take()
            && self.keep_alive
            && c.buf.is_empty()
        {
            self.idle.checkin(c, since);
        }
    }
}

fn poll_fill<S: AsyncRead + Unpin>(
    conn: &mut Conn<S>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    conn.buf.reserve(16 * 1024);
    // `read_buf` keeps no state between polls: a fresh one each time is fine.
    std::pin::pin!(conn.stream.read_buf(&mut conn.buf)).poll(cx)
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed mid-body")
}

impl<S: AsyncRead + Unpin> Body for H1Body<S> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        let began = this.began.take();
        let finish = |b: &mut Self| match began {
            Some(at) => b.finish_at(at),
            None => b.finish(),
        };
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let until_close = matches!(this.state, State::UntilClose);
            match this.state.decode(&mut conn.buf) {
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Step::Data(d)) => {
                    if matches!(this.state, State::Done) {
                        finish(this);
                    }
                    this.timer = None;
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Step::Trailers(t)) => {
                    finish(this);
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Ok(Step::End) => {
                    finish(this);
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {}
            }
            match poll_fill(conn, cx) {
                Poll::Ready(Ok(0)) if until_close => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(eof())));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending => {
                    let limit = this.stream_idle;
                    let deadline = this.response_deadline;
                    let timer = this.timer.get_or_insert_with(|| {
                        let idle = tokio::time::Instant::now() + limit;
                        let at = deadline.map_or(idle, |d| d.min(idle));
                        Box::pin(tokio::time::sleep_until(at))
                    });
                    ready!(timer.as_mut().poll(cx));
                    this.conn = None;
                    let route = deadline.is_some_and(|d| d <= tokio::time::Instant::now());
                    return Poll::Ready(Some(Err(if route {
                        io::Error::new(io::ErrorKind::TimedOut, RouteTimeout)
                    } else {
                        io::Error::new(io::ErrorKind::TimedOut, "upstream stream idle timeout")
                    })));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_kept_timer_bounds_each_response_head_by_its_own_wait() {
        use tokio::io::AsyncWriteExt;
        let (client, mut upstream) = tokio::io::duplex(4096);
        let mut conn = Conn::new(client);
        let long = Timeouts {
            stream_idle: Duration::from_secs(60),
            deadline: None,
            response_deadline: None,
        };
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        upstream.write_all(answer).await.expect("write");
        // The first wait arms the connection's timer 60 s out.
        let r =
            read_head_bounded(&mut conn, false, false, &long, tokio::time::Instant::now()).await;
        assert!(matches!(r, Ok(Ok(_))));

        // A try deadline before the kept timer: the wait ends at it.
        let start = tokio::time::Instant::now();
        let short = Timeouts {
            deadline: Some(start + Duration::from_millis(100)),
            ..long
        };
        let r =
            read_head_bounded(&mut conn, false, false, &short, tokio::time::Instant::now()).await;
        assert!(matches!(r, Err(ForwardError::TryTimeout)));
        assert!(start.elapsed() < Duration::from_secs(1));

        // The kept timer is now behind the next bound: its firing re-arms
        // it and is not taken for the stream idle timeout, which comes at 5 s.
        let start = tokio::time::Instant::now();
        let idle = Timeouts {
            stream_idle: Duration::from_secs(5),
            ..long
        };
        let r =
            read_head_bounded(&mut conn, false, false, &idle, tokio::time::Instant::now()).await;
        assert!(matches!(r, Err(ForwardError::StreamIdle(_))));
        assert!(start.elapsed() >= Duration::from_secs(5));

        // And an answer within the bound is read as ever.
        upstream.write_all(answer).await.expect("write");
        let r =
            read_head_bounded(&mut conn, false, false, &idle, tokio::time::Instant::now()).await;
        assert!(matches!(r, Ok(Ok(_))));
    }

    fn head(raw: &str, head_request: bool) -> Result<Head, &'static str> {
        let mut b = BytesMut::from(raw.as_bytes());
        parse_head(&mut b, head_request).map(|h| h.expect("complete"))
    }

    #[test]
    fn response_framing_from_an_upstream_that_may_lie() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false).expect("ok");
        assert!(matches!(h.state, State::Length(5)) && h.keep_alive);
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert!(matches!(
            h.expect("same length twice").state,
            State::Length(5)
        ));
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert!(matches!(h.expect("chunked last").state, State::Chunked(_)));
        let h = head("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false).expect("ok");
        assert!(matches!(h.state, State::UntilClose) && !h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false).expect("ok");
        assert!(matches!(h.state, State::Done) && !h.keep_alive);
        for (raw, why) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                "conflicting content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                "both transfer-encoding and content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both transfer-encoding and content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                "transfer-encoding without chunked last",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "bad content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: +1\r\n\r\n",
                "bad content-length",
            ),
        ] {
            assert_eq!(head(raw, false).err(), Some(why), "{raw:?}");
        }
        // No body, whatever the head says: HEAD, 204, 304.
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).expect("ok");
        assert!(matches!(h.state, State::Done));
        let h = head(
            "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            false,
        )
        .expect("ok");
        assert!(matches!(h.state, State::Done));
        // Headers keep their order and repeats.
        let h = head(
            "HTTP/1.1 200 OK\r\nSet-Cookie: a\r\nX: 1\r\nSet-Cookie: b\r\n\r\n",
            false,
        );
        let h = h.expect("ok");
        let cookies: Vec<_> = h.response.headers().get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a", "b"]);
    }

    #[test]
    fn hop_by_hop_response_headers_stay_out_of_the_map_unless_more_is_named() {
        let names = |h: &Head| {
            let mut v: Vec<String> = h.response.headers().keys().map(|k| k.to_string()).collect();
            v.sort();
            v
        };
        // The common case: framing and keep-alive are read, not kept.
        let h = head(
            "HTTP/1.1 200 OK\r\nServer: up\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n",
            false,
        )
        .expect("ok");
        assert!(matches!(h.state, State::Chunked(_)) && h.keep_alive);
        assert_eq!(names(&h), ["server", "x-a"]);
        let h = head("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n", false).expect("ok");
        assert!(!h.keep_alive && names(&h).is_empty());
        // A Connection header naming another header: all stay, for the
        // strip that removes the named ones too.
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .expect("ok");
        assert!(!h.keep_alive);
        assert_eq!(names(&h), ["connection", "content-length", "x-secret"]);
        // Switching protocols keeps its Connection and Upgrade.
        let h = head(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            false,
        )
        .expect("ok");
        assert_eq!(names(&h), ["connection", "upgrade"]);
    }

    fn raw_head(raw: &str) -> Head {
        let mut b = BytesMut::from(raw.as_bytes());
        parse_head_as(&mut b, false, true)
            .expect("ok")
            .expect("complete")
    }

    #[test]
    fn raw_headers_are_the_upstreams_less_hop_by_hop_and_a_map_when_one_is_needed() {
        let h = raw_head(
            "HTTP/1.1 200 OK\r\nServer: Up\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nDate: d\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert!(h.response.headers().is_empty());
        let r = h.raw.expect("raw");
        let got: Vec<(String, String)> = r
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("Server".to_string(), "Up".to_string()),
                ("Date".to_string(), "d".to_string()),
                ("Content-Length".to_string(), "5".to_string()),
            ]
        );
        assert_eq!(r.content_length(), Some(5));
        assert!(r.has_date());
        assert!(matches!(h.state, State::Length(5)) && h.keep_alive);
        r.recycle();
        // A reused span list starts empty.
        let r = raw_head("HTTP/1.1 204 No Content\r\n\r\n")
            .raw
            .expect("raw");
        assert_eq!(r.iter().count(), 0);
        assert!(!r.has_date() && r.content_length().is_none());
        // What retry policies look up, a Connection naming headers, and a
        // 101 get a map.
        for (head, name) in [
            (
                "HTTP/1.1 200 OK\r\nGrpc-Status: 14\r\nContent-Length: 0\r\n\r\n",
                "grpc-status",
            ),
            (
                "HTTP/1.1 429 Too Many\r\nX-Envoy-Ratelimited: true\r\nContent-Length: 0\r\n\r\n",
                "x-envoy-ratelimited",
            ),
            (
                "HTTP/1.1 200 OK\r\nConnection: x-a\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n",
                "x-a",
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
                "upgrade",
            ),
        ] {
            let h = raw_head(head);
            assert!(h.raw.is_none(), "{head:?}");
            assert!(h.response.headers().contains_key(name), "{head:?}");
        }
        // The same refusals as with a map: a control byte in a value, two
        // lengths, both framings.
        for head in [
            "HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        ] {
            let mut b = BytesMut::from(head.as_bytes());
            assert!(parse_head_as(&mut b, false, true).is_err(), "{head:?}");
            let mut b = BytesMut::from(head.as_bytes());
            assert!(parse_head_as(&mut b, false, false).is_err(), "{head:?}");
        }
    }
}
