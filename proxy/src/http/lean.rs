//! *lean*: the HTTP/1.1 server path for the common request, in the
//! connection's own task, as the upstream client (`h1.rs`) already is.
//!
//! A request head is parsed with `httparse` out of the connection's read
//! buffer (reused; header values share its bytes, nothing is copied), the
//! request is handled inline, and the response head, and the body frames
//! that are already there, are written with one `write` from a reused
//! buffer. No task, channel or timer is made per request.
//!
//! The lean path takes only requests whose framing leaves no room for
//! doubt: HTTP/1.1, no `Transfer-Encoding`, at most one `Content-Length`
//! (digits only, at most [`LEAN_BODY`]) whose whole body came with the head
//! (read with it, or already in the socket: the path never waits for a
//! body), no `Expect`, no upgrade, no CONNECT, an origin-form target, at
//! most 100 headers, the head within its limit. At the first request that
//! is anything else (a chunked or larger body, one still on its way,
//! HTTP/1.0, a malformed or oversized head, ...) the rest of the connection
//! goes to hyper's server, with the bytes read so far put back in front:
//! every strictness rule, error status and streamed-body case stays
//! hyper's, as before this path existed. A client that mixes GETs and
//! small POSTs on one connection stays on the lean path; its first chunked
//! or large upload moves the connection to hyper.
//!
//! What the connection keeps of hyper's behaviour, and is tested for:
//! - the head timeout from accept (first request) or from the first byte of
//!   a head (later ones), the idle timeout between requests (looked at
//!   lazily, one timer per connection, as `serve::drive` does);
//! - a client that closes while its request is upstream cancels it (hyper
//!   without half-close, as Envoy resets the upstream stream);
//! - `Connection: close` from either side (and on drain) ends the
//!   connection after the response;
//! - response framing: `Content-Length` when known, else chunked; none for
//!   HEAD, 1xx, 204 and 304; a `Date` header when the response has none;
//!   trailers only to a client that sent `TE: trailers`;
//! - a response body that fails or ends short of its length closes the
//!   connection (the client sees a truncated message, never a wrong one).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::Shared;
use crate::http::body::{BodySource, RespBody, RespKind};
use crate::http::decide::ConnContext;
use crate::http::headers::{has_token, write_header};
use crate::http::serve::{ConnState, handle};

/// Headers the lean path parses on the stack; a request with more goes to
/// hyper (which applies the configured limit).
const MAX_HEADERS: usize = 100;
/// Body frames up to this are copied behind the head (one write); larger
/// ones are written on their own.
const COALESCE: usize = 16 * 1024;
/// The largest request body the lean path takes (whole, with its head);
/// a larger one is streamed by hyper.
pub const LEAN_BODY: usize = 16 * 1024;

/// The stream with bytes already read put back in front, for hyper: what
/// protocol detection or the lean path read and did not use.
pub struct Rewind<S> {
    buf: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    /// `buf` is read first, then `inner`.
    pub fn new(buf: BytesMut, inner: S) -> Self {
        Rewind { buf, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.buf.is_empty() {
            let n = this.buf.len().min(out.remaining());
            out.put_slice(&this.buf[..n]);
            this.buf.advance(n);
            if this.buf.is_empty() {
                // Read out: its memory is not kept for the connection's life.
                this.buf = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the first look at a head found.
enum Scan {
    /// More bytes are needed (and the head is still within its limit).
    Partial,
    /// Not for the lean path: hyper takes the connection from here.
    Other,
    Simple(Meta),
}

/// A simple request head: where its parts are in the buffer.
struct Meta {
    len: usize,
    /// The body's length (`Content-Length`), after the head.
    body: usize,
    method: Method,
    path: (usize, usize),
    /// The client asked to close after this response.
    close: bool,
    /// The client accepts trailers (`TE: trailers`).
    trailers: bool,
}

/// Header name and value spans: (name start, name end, value start, value end).
type Span = [u32; 4];

/// Looks at the head at the start of `buf` (no copies): complete and
/// simple, incomplete, or something else. `spans` gets the headers'.
fn scan(buf: &[u8], max_head: usize, max_headers: usize, spans: &mut Vec<Span>) -> Scan {
    // Left uninitialised: httparse fills only what it parses (writing 100
    // empty headers first cost about 200 instructions a request).
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let limit = max_headers.min(MAX_HEADERS);
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers[..limit]) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if buf.len() <= max_head => return Scan::Partial,
        _ => return Scan::Other,
    };
    if req.version != Some(1) {
        return Scan::Other;
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Scan::Other;
    };
    if !path.starts_with('/') {
        return Scan::Other;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Scan::Other;
    };
    if method == Method::CONNECT {
        return Scan::Other;
    }
    let base = buf.as_ptr() as usize;
    let off = |p: *const u8| (p as usize - base) as u32;
    let mut close = false;
    let mut trailers = false;
    let mut length: Option<usize> = None;
    spans.clear();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let v = h.value;
        match name.len() {
            // One `Content-Length` of at most six digits and LEAN_BODY; a
            // second one (even equal), a list, a sign or any other spelling,
            // or any Transfer-Encoding goes to hyper.
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                let v = v.trim_ascii();
                if length.is_some()
                    || v.is_empty()
                    || v.len() > 6
                    || !v.iter().all(u8::is_ascii_digit)
                {
                    return Scan::Other;
                }
                let n = v.iter().fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
                if n > LEAN_BODY {
                    return Scan::Other;
                }
                length = Some(n);
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => return Scan::Other,
            6 if name.eq_ignore_ascii_case(b"expect") => return Scan::Other,
            7 if name.eq_ignore_ascii_case(b"upgrade") => return Scan::Other,
            10 if name.eq_ignore_ascii_case(b"connection") => {
                if has_token(v, b"upgrade") {
                    return Scan::Other;
                }
                close |= has_token(v, b"close");
            }
            2 if name.eq_ignore_ascii_case(b"te") => trailers |= has_token(v, b"trailers"),
            _ => {}
        }
        let n = off(h.name.as_ptr());
        let s = off(v.as_ptr());
        spans.push([n, n + name.len() as u32, s, s + v.len() as u32]);
    }
    let p = off(path.as_ptr()) as usize;
    Scan::Simple(Meta {
        len,
        body: length.unwrap_or(0),
        method,
        path: (p, p + path.len()),
        close,
        trailers,
    })
}

/// The request parts of a scanned head (its bytes shared, not copied).
/// `None`: a name, value or target `http` refuses (hyper then answers).
fn build(head: &Bytes, meta: &Meta, spans: &[Span]) -> Option<http::request::Parts> {
    let uri = Uri::from_maybe_shared(head.slice(meta.path.0..meta.path.1)).ok()?;
    // Room for what forwarding adds (x-forwarded-for, -proto, x-request-id)
    // without the map growing, and no more (route headers may grow it).
    let mut headers = crate::http::headers::header_map(spans.len() + 3);
    for &[n0, n1, v0, v1] in spans {
        let name = crate::http::headers::header_name(&head[n0 as usize..n1 as usize]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0 as usize..v1 as usize)).ok()?;
        headers.append(name, value);
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = meta.method.clone();
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Some(parts)
}

/// The lean path's reading of the request at the start of `buf`, for the
/// fuzz target: the request head, the head's length and the body's, when
/// the lean path would serve it from these bytes; `None` when it would
/// read more or hand the bytes to hyper.
pub fn parse_simple(
    buf: &[u8],
    max_head: usize,
    max_headers: usize,
) -> Option<(http::request::Parts, usize, usize)> {
    let mut spans = Vec::new();
    let Scan::Simple(meta) = scan(buf, max_head, max_headers, &mut spans) else {
        return None;
    };
    if buf.len() < meta.len + meta.body {
        return None;
    }
    let head = Bytes::copy_from_slice(&buf[..meta.len]);
    build(&head, &meta, &spans).map(|p| (p, meta.len, meta.body))
}

/// Serves the connection's HTTP/1.1 requests while they are simple; `buf`
/// holds what was already read. `None`: the connection is done. `Some`:
/// hyper serves the rest.
pub(crate) async fn serve<S>(
    shared: &Arc<Shared>,
    state: &Arc<ConnState>,
    conn: &Arc<ConnContext>,
    mut io: S,
    mut buf: BytesMut,
) -> Option<Rewind<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &shared.limits;
    let max_head = limits.max_request_head_bytes;
    // The read buffer, reused for every head (detection's bytes first).
    buf.reserve(8 * 1024);
    // Grown by the first response, then reused.
    let mut out: Vec<u8> = Vec::new();
    let mut spans: Vec<Span> = Vec::with_capacity(32);
    // One timer for the connection, reset only when it fires or a head
    // arrives in pieces (see `serve::drive`).
    let mut head_deadline = Some(state.start + limits.request_head_timeout);
    let mut timer_at = state.start + limits.request_head_timeout.min(limits.idle_timeout);
    let timer = tokio::time::sleep_until(timer_at);
    let mut timer = std::pin::pin!(timer);
    // Whether the timer was polled since it was last set: it then holds
    // the task's waker, and `is_elapsed` (a load) says whether it fired.
    // Polling it again on every wait would re-register the waker (atomic
    // operations each request) for nothing.
    let mut armed = false;
    let mut seen = 0;
    loop {
        // A head.
        let meta = loop {
            if !buf.is_empty() {
                match scan(&buf, max_head, limits.max_request_headers, &mut spans) {
                    Scan::Simple(m) if buf.len() >= m.len + m.body => break m,
                    Scan::Simple(m) => {
                        // The head is here and its body is not, all: what
                        // the socket already holds is read, without
                        // waiting. A body still on its way is hyper's to
                        // stream (the upstream gets the head now, as
                        // before this path took bodies).
                        buf.reserve(m.len + m.body - buf.len());
                        match io.read_buf(&mut buf).now_or_never() {
                            Some(Ok(n)) if n > 0 => continue,
                            _ => return Some(Rewind { buf, inner: io }),
                        }
                    }
                    Scan::Other => return Some(Rewind { buf, inner: io }),
                    Scan::Partial => {
                        if head_deadline.is_none() {
                            let at = tokio::time::Instant::now() + limits.request_head_timeout;
                            head_deadline = Some(at);
                            if at < timer_at {
                                timer_at = at;
                                timer.as_mut().reset(at);
                                armed = false;
                            }
                        }
                    }
                }
            }
            buf.reserve(4 * 1024);
            let fired = {
                let mut read = std::pin::pin!(io.read_buf(&mut buf));
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = read.as_mut().poll(cx) {
                        return Poll::Ready(Some(r));
                    }
                    let fired = if armed {
                        timer.is_elapsed()
                    } else {
                        armed = true;
                        timer.as_mut().poll(cx).is_ready()
                    };
                    if fired {
                        Poll::Ready(None)
                    } else {
                        Poll::Pending
                    }
                })
                .await
            };
            match fired {
                Some(Ok(0) | Err(_)) => return None,
                Some(Ok(_)) => {}
                None => {
                    let now = tokio::time::Instant::now();
                    if head_deadline.is_some_and(|d| now >= d) {
                        tracing::debug!(peer = %conn.peer, "no complete request head in time; closing");
                        return None;
                    }
                    let requests = state.requests();
                    if buf.is_empty() && requests == seen && requests > 0 {
                        tracing::debug!(peer = %conn.peer, requests, "closing an idle downstream connection");
                        return None;
                    }
                    seen = requests;
                    timer_at = now + limits.idle_timeout;
                    if let Some(d) = head_deadline {
                        timer_at = timer_at.min(d);
                    }
                    timer.as_mut().reset(timer_at);
                    armed = false;
                }
            }
        };
        head_deadline = None;
        let head = buf.split_to(meta.len).freeze();
        let Some(mut parts) = build(&head, &meta, &spans) else {
            // hyper answers what `http` refuses: the head goes back first.
            let mut all = BytesMut::with_capacity(head.len() + buf.len());
            all.extend_from_slice(&head);
            all.extend_from_slice(&buf);
            return Some(Rewind {
                buf: all,
                inner: io,
            });
        };
        drop(head);
        let body = (meta.body > 0).then(|| BodySource::Whole(buf.split_to(meta.body).freeze()));
        let head_request = parts.method == Method::HEAD;
        // The request, while the client is watched: one that closes (or
        // resets) takes its request with it. Bytes it pipelines are kept.
        let resp = {
            let h = handle(shared, conn, state, &mut parts, body, None, true);
            let mut h = std::pin::pin!(h);
            loop {
                if buf.len() >= max_head {
                    break h.await;
                }
                buf.reserve(1024);
                tokio::select! {
                    biased;
                    r = h.as_mut() => break r,
                    r = io.read_buf(&mut buf) => match r {
                        Ok(0) | Err(_) => {
                            tracing::debug!(peer = %conn.peer, "client closed with its request in flight");
                            return None;
                        }
                        Ok(_) => {}
                    },
                }
            }
        };
        let keep = match write_response(&mut io, &mut out, resp, head_request, &meta).await {
            Ok(keep) => keep && !meta.close,
            Err(e) => {
                tracing::debug!(peer = %conn.peer, error = %e, "writing the response failed");
                return None;
            }
        };
        if !keep {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), io.shutdown()).await;
            return None;
        }
    }
}

/// How a response body is delimited on the wire.
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// `HTTP/1.1 <code> <reason>\r\n`.
fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes the response: head and body. `Ok(true)`: the connection can
/// take another request.
async fn write_response<S: AsyncWrite + Unpin>(
    io: &mut S,
    out: &mut Vec<u8>,
    resp: Response<RespBody>,
    head_request: bool,
    meta: &Meta,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let raw = match &mut body.kind {
        RespKind::H1(b) => b.take_raw_headers(),
        _ => None,
    };
    let status = parts.status;
    let h = &parts.headers;
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    out.clear();
    status_line(out, status);
    // What framing and the connection need is noted as the headers pass:
    // no lookups after.
    let mut keep = true;
    let mut connection = false;
    let mut date = false;
    // The Content-Length to frame by: `Some(None)` for one that is no number.
    let mut length: Option<Option<u64>> = None;
    // The upstream's headers as it sent them (hop-by-hop ones already out,
    // Content-Length checked), names lowercased as a map would have them.
    if let Some(r) = &raw {
        for (name, value) in r.iter() {
            let at = out.len();
            write_header(out, name, value);
            out[at..at + name.len()].make_ascii_lowercase();
        }
        length = r.content_length().map(Some);
        date = r.has_date();
    }
    for (name, value) in h {
        if name == header::TRANSFER_ENCODING {
            // Framing is this hop's: set below, never copied from the message.
            continue;
        } else if name == header::CONTENT_LENGTH {
            length =
                length.or_else(|| Some(value.to_str().ok().and_then(|s| s.trim().parse().ok())));
        } else if name == header::DATE {
            date = true;
        } else if name == header::CONNECTION {
            connection = true;
            keep &= !has_token(value.as_bytes(), b"close");
        }
        write_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let framing = if no_body {
        Framing::None
    } else if let Some(v) = length {
        match v {
            Some(n) => Framing::Length(n),
            // Cannot be: both sides' lengths are checked. Delimit by close.
            None => {
                keep = false;
                Framing::Length(u64::MAX)
            }
        }
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa(n, &mut [0u8; 20]));
        out.extend_from_slice(b"\r\n");
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if !date {
        out.extend_from_slice(b"date: ");
        date::with(|d| out.extend_from_slice(d));
        out.extend_from_slice(b"\r\n");
    }
    if (!keep || meta.close) && !connection {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    crate::http::headers::recycle(parts.headers);
    if let Some(r) = raw {
        r.recycle();
    }
    let mut remaining = match framing {
        Framing::None => {
            // A body that has ended is polled once, so an upstream
            // connection it reads from goes back to its pool; then it is
            // recorded when dropped.
            if body.is_end_stream() {
                let _ = Pin::new(&mut body)
                    .poll_frame(&mut Context::from_waker(std::task::Waker::noop()));
            }
            drop(body);
            send(io, out).await?;
            return Ok(keep);
        }
        Framing::Length(n) => n,
        Framing::Chunked => u64::MAX,
    };
    let chunked = matches!(framing, Framing::Chunked);
    let mut body = Pin::new(&mut body);
    loop {
        // Frames already there go behind what is buffered; the buffer is
        // written before waiting for more.
        let frame = if out.is_empty() {
            std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
        } else {
            let polled = {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                body.as_mut().poll_frame(&mut cx)
            };
            match polled {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    send(io, out).await?;
                    continue;
                }
            }
        };
        match frame {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed; closing the connection");
                if !out.is_empty() {
                    send(io, out).await?;
                }
                return Ok(false);
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => {
                    if d.is_empty() {
                        continue;
                    }
                    let d = if chunked {
                        d
                    } else {
                        if d.len() as u64 > remaining {
                            // More than its length: cut, and close.
                            let keep_len = remaining as usize;
                            put(io, out, &d.slice(..keep_len), false).await?;
                            send(io, out).await?;
                            return Ok(false);
                        }
                        remaining -= d.len() as u64;
                        d
                    };
                    put(io, out, &d, chunked).await?;
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers()
                        && chunked
                        && meta.trailers
                    {
                        end_chunks(out, Some(&t));
                        send(io, out).await?;
                        return Ok(keep);
                    }
                }
            },
        }
    }
    if chunked {
        end_chunks(out, None);
    } else if remaining != 0 {
        // Ended short of its length: the client must not wait for the rest.
        keep = false;
    }
    send(io, out).await?;
    Ok(keep)
}

/// Writes what is buffered and flushes (a TLS stream writes its records).
async fn send<S: AsyncWrite + Unpin>(io: &mut S, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    io.flush().await
}

/// Buffers (or, when large, writes) one data frame.
async fn put<S: AsyncWrite + Unpin>(
    io: &mut S,
    out: &mut Vec<u8>,
    d: &[u8],
    chunked: bool,
) -> io::Result<()> {
    if chunked {
        let mut hex = [0u8; 16];
        let n = format_hex(d.len(), &mut hex);
        out.extend_from_slice(n);
        out.extend_from_slice(b"\r\n");
    }
    if d.len() <= COALESCE {
        out.extend_from_slice(d);
    } else {
        io.write_all(out).await?;
        out.clear();
        io.write_all(d).await?;
        io.flush().await?;
    }
    if chunked {
        out.extend_from_slice(b"\r\n");
    }
    Ok(())
}

fn end_chunks(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        write_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

fn format_hex(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The `Date` header's value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    struct Cached {
        secs: u64,
        text: [u8; 29],
    }

    thread_local! {
        static CACHED: RefCell<Cached> = const { RefCell::new(Cached { secs: u64::MAX, text: [0; 29] }) };
    }

    pub fn with(f: impl FnOnce(&[u8])) {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.secs != secs {
                c.secs = secs;
                c.text = imf_fixdate(secs);
            }
            f(&c.text);
        });
    }

    /// RFC 9110 5.6.7: `Sun, 06 Nov 1994 08:49:37 GMT`.
    pub fn imf_fixdate(secs: u64) -> [u8; 29] {
        const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
        const MONTHS: [&[u8; 3]; 12] = [
            b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
            b"Dec",
        ];
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let mut t = [0u8; 29];
        t[..3].copy_from_slice(DAYS[(days % 7) as usize]);
        t[3..5].copy_from_slice(b", ");
        let two = |v: i64| [b'0' + (v / 10 % 10) as u8, b'0' + (v % 10) as u8];
        t[5..7].copy_from_slice(&two(d));
        t[7] = b' ';
        t[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
        t[11] = b' ';
        t[12..14].copy_from_slice(&two(year / 100));
        t[14..16].copy_from_slice(&two(year % 100));
        t[16] = b' ';
        t[17..19].copy_from_slice(&two(h as i64));
        t[19] = b':';
        t[20..22].copy_from_slice(&two(m as i64));
        t[22] = b':';
        t[23..25].copy_from_slice(&two(s as i64));
        t[25..29].copy_from_slice(b" GMT");
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_str(s: &str) -> Scan {
        scan(s.as_bytes(), 64 * 1024, 100, &mut Vec::new())
    }

    #[test]
    fn simple_requests_are_lean_and_everything_else_goes_to_hyper() {
        assert!(matches!(
            scan_str("GET /a?b HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTE: trailers\r\n\r\n"),
            Scan::Simple(Meta {
                close: true,
                trailers: true,
                ..
            })
        ));
        assert!(matches!(
            scan_str("DELETE / HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n"),
            Scan::Simple(_)
        ));
        assert!(matches!(
            scan_str("GET / HTTP/1.1\r\nHost: x\r\n"),
            Scan::Partial
        ));
        // A small Content-Length body: its length is the head's to say
        // (whether it is all there is the caller's to look at).
        for (req, n) in [
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
                5,
            ),
            (
                "PUT / HTTP/1.1\r\nHost: x\r\ncontent-length:  12 \r\n\r\n",
                12,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 016384\r\n\r\n",
                LEAN_BODY,
            ),
        ] {
            match scan_str(req) {
                Scan::Simple(m) => assert_eq!(m.body, n, "{req:?}"),
                _ => panic!("not simple: {req:?}"),
            }
        }
        for other in [
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 16385\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0000005\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET\x01 / HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert!(matches!(scan_str(other), Scan::Other), "{other:?}");
        }
        // Over the head limit, complete or not.
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(200));
        assert!(matches!(
            scan(big.as_bytes(), 100, 100, &mut Vec::new()),
            Scan::Other
        ));
        assert!(matches!(
            scan(&big.as_bytes()[..150], 100, 100, &mut Vec::new()),
            Scan::Other
        ));
        // Over the header count.
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(5));
        assert!(matches!(
            scan(many.as_bytes(), 1 << 16, 4, &mut Vec::new()),
            Scan::Other
        ));
    }

    #[test]
    fn built_parts_share_the_head_and_refusals_go_to_hyper() {
        let raw = "GET /p?q=1 HTTP/1.1\r\nHost: site\r\nX-A: 1\r\nx-a: 2\r\n\r\n";
        let mut spans = Vec::new();
        let Scan::Simple(m) = scan(raw.as_bytes(), 1 << 16, 100, &mut spans) else {
            panic!("not simple");
        };
        let head = Bytes::copy_from_slice(&raw.as_bytes()[..m.len]);
        let parts = build(&head, &m, &spans).expect("parts");
        assert_eq!(parts.method, Method::GET);
        assert_eq!(parts.uri, "/p?q=1");
        assert_eq!(parts.headers["host"], "site");
        assert_eq!(parts.headers.get_all("x-a").iter().count(), 2);
        // What `http` refuses gives `None` (the caller hands the bytes to
        // hyper): a control byte in a value, spans made by hand.
        let head = Bytes::from_static(b"GET / HTTP/1.1\r\nx: a\x01b\r\n\r\n");
        let m = Meta {
            len: head.len(),
            body: 0,
            method: Method::GET,
            path: (4, 5),
            close: false,
            trailers: false,
        };
        assert!(build(&head, &m, &[[16, 17, 19, 22]]).is_none());
        assert!(build(&head, &m, &[[16, 17, 19, 20]]).is_some());
    }

    #[tokio::test]
    async fn rewind_reads_its_bytes_first_then_lets_them_go() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.expect("write");
        drop(client);
        let mut buf = BytesMut::with_capacity(8 * 1024);
        buf.extend_from_slice(b"hello");
        let mut r = Rewind::new(buf, server);
        let mut s = String::new();
        r.read_to_string(&mut s).await.expect("read");
        assert_eq!(s, "hello world");
        assert_eq!(r.buf.capacity(), 0, "the read-out buffer is kept");
    }

    #[test]
    fn dates_are_imf_fixdate() {
        assert_eq!(
            &date::imf_fixdate(784_111_777),
            b"Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(&date::imf_fixdate(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            &date::imf_fixdate(1_709_164_800),
            b"Thu, 29 Feb 2024 00:00:00 GMT"
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(1234567, &mut [0; 20]), b"1234567");
        assert_eq!(format_hex(0, &mut [0; 16]), b"0");
        assert_eq!(format_hex(0x1f40, &mut [0; 16]), b"1f40");
    }
}
