//! HTTP/1.1 to upstream endpoints, inside the request's own task.
//!
//! hyper's pooled client runs each upstream connection as a separate task
//! and hands requests to it over channels; for a proxy that is a task hop
//! and a pool lock per request. Here the request task checks a connection
//! out of the endpoint's idle list, writes the request, parses the response
//! head with `httparse`, and the response body reads the same socket while
//! hyper's server streams it downstream. When the body ends cleanly the
//! connection goes back to the idle list (LIFO, 60 s idle limit).
//!
//! A request that meets a reused connection the upstream already closed (EOF
//! or reset before any response byte) is sent again once on a new connection,
//! when its body is empty and so can be replayed (Istio's 503 UC,
//! istio/istio#13205). Requests with a body check the idle connection first.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_IDLE_PER_ENDPOINT: usize = 1024;
const MAX_HEAD: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An open connection to one endpoint, with what was read past the last message.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    since: Instant,
}

/// Idle keep-alive connections of one endpoint.
#[derive(Default)]
pub struct IdlePool {
    conns: Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.conns.lock().map(|c| c.len()).unwrap_or(0);
        write!(f, "IdlePool({n})")
    }
}

impl IdlePool {
    fn checkout(&self) -> Option<Conn> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = conns.pop() {
            if c.since.elapsed() < IDLE_TIMEOUT {
                return Some(c);
            }
        }
        None
    }

    fn checkin(&self, mut c: Conn) {
        c.since = Instant::now();
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.len() < MAX_IDLE_PER_ENDPOINT {
            conns.push(c);
        }
    }
}

#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (503 UF).
    Connect(io::Error),
    /// The connection failed or the response was malformed before the head (503 UC).
    Reset(io::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Reset(e) => write!(f, "upstream reset: {e}"),
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<Conn, SendError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            SendError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))
        })?
        .map_err(SendError::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(Conn {
        stream,
        buf: BytesMut::with_capacity(8 * 1024),
        since: Instant::now(),
    })
}

/// True when an idle connection still looks usable (no EOF, no stray bytes).
fn looks_alive(c: &Conn) -> bool {
    let mut probe = [0u8; 1];
    matches!(c.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

fn encode_head(parts: &http::request::Parts, framing: &Framing) -> BytesMut {
    let mut b = BytesMut::with_capacity(512);
    b.put_slice(parts.method.as_str().as_bytes());
    b.put_u8(b' ');
    b.put_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    b.put_slice(b" HTTP/1.1\r\n");
    for (k, v) in &parts.headers {
        if k == header::CONTENT_LENGTH && !matches!(framing, Framing::Length(_)) {
            continue;
        }
        b.put_slice(k.as_str().as_bytes());
        b.put_slice(b": ");
        b.put_slice(v.as_bytes());
        b.put_slice(b"\r\n");
    }
    match framing {
        Framing::Chunked => b.put_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length(n) if !parts.headers.contains_key(header::CONTENT_LENGTH) => {
            b.put_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        Framing::Empty
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
                && !parts.headers.contains_key(header::CONTENT_LENGTH) =>
        {
            b.put_slice(b"content-length: 0\r\n");
        }
        _ => {}
    }
    b.put_slice(b"\r\n");
    b
}

/// Sends one request to `addr` over a pooled HTTP/1.1 connection.
pub async fn send<B>(
    pool: &Arc<IdlePool>,
    addr: SocketAddr,
    parts: http::request::Parts,
    mut body: B,
) -> Result<Response<H1Body>, SendError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
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
    let head = encode_head(&parts, &framing).freeze();
    let head_request = parts.method == Method::HEAD;
    let mut reused_failed = false;
    loop {
        let idle = if reused_failed { None } else { pool.checkout() };
        let (mut conn, reused) = match idle {
            Some(c) if replayable || looks_alive(&c) => (c, true),
            _ => (connect(addr).await?, false),
        };
        if let Err(e) = conn.stream.write_all(&head).await {
            if reused && replayable && !reused_failed {
                reused_failed = true;
                continue;
            }
            return Err(SendError::Reset(e));
        }
        if !replayable {
            write_body(&mut conn, &mut body, &framing).await?;
        }
        match read_head(&mut conn, head_request).await {
            Ok((resp, state, keep_alive)) => {
                let mut body = H1Body {
                    conn: Some(conn),
                    state,
                    keep_alive,
                    pool: pool.clone(),
                };
                if matches!(body.state, State::Done) {
                    body.finish();
                }
                return Ok(resp.map(|()| body));
            }
            Err(HeadError {
                nothing_read: true, ..
            }) if reused && replayable && !reused_failed => {
                tracing::debug!(%addr, "kept-alive connection closed by upstream; retrying on a new one");
                reused_failed = true;
            }
            Err(e) => return Err(SendError::Reset(e.error)),
        }
    }
}

async fn write_body<B>(conn: &mut Conn, body: &mut B, framing: &Framing) -> Result<(), SendError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let chunked = matches!(framing, Framing::Chunked);
    let io_err = |e: io::Error| SendError::Reset(e);
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| SendError::Reset(io::Error::other(format!("downstream body: {e}"))))?;
        if let Ok(data) = frame.into_data() {
            if data.is_empty() {
                continue;
            }
            if chunked {
                conn.stream
                    .write_all(format!("{:x}\r\n", data.len()).as_bytes())
                    .await
                    .map_err(io_err)?;
                conn.stream.write_all(&data).await.map_err(io_err)?;
                conn.stream.write_all(b"\r\n").await.map_err(io_err)?;
            } else {
                conn.stream.write_all(&data).await.map_err(io_err)?;
            }
        }
    }
    if chunked {
        conn.stream.write_all(b"0\r\n\r\n").await.map_err(io_err)?;
    }
    Ok(())
}

struct HeadError {
    error: io::Error,
    nothing_read: bool,
}

fn bad(msg: &str) -> HeadError {
    HeadError {
        error: io::Error::new(io::ErrorKind::InvalidData, msg.to_string()),
        nothing_read: false,
    }
}

async fn read_head(
    conn: &mut Conn,
    head_request: bool,
) -> Result<(Response<()>, State, bool), HeadError> {
    let mut read_any = !conn.buf.is_empty();
    loop {
        if !conn.buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 100];
            let mut r = httparse::Response::new(&mut headers);
            match r.parse(&conn.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = r.code.unwrap_or(0);
                    let version = r.version.unwrap_or(1);
                    let status = StatusCode::from_u16(code).map_err(|_| bad("bad status code"))?;
                    let base = conn.buf.as_ptr() as usize;
                    let spans: Vec<(HeaderName, usize, usize)> = r
                        .headers
                        .iter()
                        .map(|h| {
                            let name = HeaderName::from_bytes(h.name.as_bytes())
                                .map_err(|_| bad("bad header name"))?;
                            Ok((name, h.value.as_ptr() as usize - base, h.value.len()))
                        })
                        .collect::<Result<_, HeadError>>()?;
                    let head = conn.buf.split_to(len).freeze();
                    if status.is_informational() {
                        // 100 Continue, 103 Early Hints: not forwarded.
                        continue;
                    }
                    let mut map = HeaderMap::with_capacity(spans.len());
                    for (name, off, n) in spans {
                        let v = HeaderValue::from_maybe_shared(head.slice(off..off + n))
                            .map_err(|_| bad("bad header value"))?;
                        map.append(name, v);
                    }
                    let keep_alive = version == 1
                        && !map
                            .get_all(header::CONNECTION)
                            .iter()
                            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                    let chunked = map.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
                        v.to_str()
                            .is_ok_and(|s| s.to_ascii_lowercase().contains("chunked"))
                    });
                    let state = if head_request
                        || status == StatusCode::NO_CONTENT
                        || status == StatusCode::NOT_MODIFIED
                    {
                        State::Done
                    } else if chunked {
                        State::Chunked(Chunk::Size)
                    } else if let Some(cl) = map.get(header::CONTENT_LENGTH) {
                        let n: u64 = cl
                            .to_str()
                            .ok()
                            .and_then(|s| s.trim().parse().ok())
                            .ok_or_else(|| bad("bad content-length"))?;
                        if n == 0 {
                            State::Done
                        } else {
                            State::Length(n)
                        }
                    } else {
                        State::UntilClose
                    };
                    let mut resp = Response::new(());
                    *resp.status_mut() = status;
                    *resp.version_mut() = Version::HTTP_11;
                    *resp.headers_mut() = map;
                    return Ok((resp, state, keep_alive));
                }
                Ok(httparse::Status::Partial) => {
                    if conn.buf.len() > MAX_HEAD {
                        return Err(bad("response head too large"));
                    }
                }
                Err(_) => return Err(bad("malformed response head")),
            }
        }
        conn.buf.reserve(8 * 1024);
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => {
                return Err(HeadError {
                    error: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before the response",
                    ),
                    nothing_read: !read_any,
                });
            }
            Ok(_) => read_any = true,
            Err(e) => {
                return Err(HeadError {
                    error: e,
                    nothing_read: !read_any,
                });
            }
        }
    }
}

enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

enum State {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// A response body read straight from the upstream connection.
pub struct H1Body {
    conn: Option<Conn>,
    state: State,
    /// The upstream allows reuse (HTTP/1.1, no `connection: close`).
    keep_alive: bool,
    pool: Arc<IdlePool>,
}

impl H1Body {
    /// The message ended cleanly: the connection goes back to the pool if
    /// the upstream allows it and nothing unexpected follows.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(c) = self.conn.take()
            && self.keep_alive
            && c.buf.is_empty()
        {
            self.pool.checkin(c);
        }
    }
}

fn poll_fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    loop {
        conn.buf.reserve(16 * 1024);
        match conn.stream.try_read_buf(&mut conn.buf) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready!(conn.stream.poll_read_ready(cx))?;
            }
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed mid-body")
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                State::Done => {
                    this.finish();
                    return Poll::Ready(None);
                }
                State::Length(rem) => {
                    if !conn.buf.is_empty() {
                        let n = (*rem).min(conn.buf.len() as u64) as usize;
                        *rem -= n as u64;
                        let data = conn.buf.split_to(n).freeze();
                        if *rem == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(poll_fill(conn, cx)) {
                        Ok(0) => return Poll::Ready(Some(Err(eof()))),
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
                State::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(poll_fill(conn, cx)) {
                        Ok(0) => {
                            this.state = State::Done;
                            this.conn = None;
                            return Poll::Ready(None);
                        }
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
                State::Chunked(chunk) => {
                    match chunk {
                        Chunk::Size => {
                            if let Some(i) = find_crlf(&conn.buf) {
                                let line = &conn.buf[..i];
                                let hex = line.split(|b| *b == b';').next().unwrap_or(&[]);
                                let size = std::str::from_utf8(hex)
                                    .ok()
                                    .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                                    .ok_or_else(|| {
                                        io::Error::new(io::ErrorKind::InvalidData, "bad chunk size")
                                    });
                                conn.buf.advance(i + 2);
                                match size {
                                    Ok(0) => *chunk = Chunk::Trailers,
                                    Ok(n) => *chunk = Chunk::Data(n),
                                    Err(e) => return Poll::Ready(Some(Err(e))),
                                }
                                continue;
                            }
                        }
                        Chunk::Data(rem) => {
                            if !conn.buf.is_empty() {
                                let n = (*rem).min(conn.buf.len() as u64) as usize;
                                *rem -= n as u64;
                                if *rem == 0 {
                                    *chunk = Chunk::DataEnd;
                                }
                                let data = conn.buf.split_to(n).freeze();
                                return Poll::Ready(Some(Ok(Frame::data(data))));
                            }
                        }
                        Chunk::DataEnd => {
                            if conn.buf.len() >= 2 {
                                if &conn.buf[..2] != b"\r\n" {
                                    return Poll::Ready(Some(Err(io::Error::new(
                                        io::ErrorKind::InvalidData,
                                        "bad chunk end",
                                    ))));
                                }
                                conn.buf.advance(2);
                                *chunk = Chunk::Size;
                                continue;
                            }
                        }
                        Chunk::Trailers => {
                            if let Some(end) = conn
                                .buf
                                .windows(2)
                                .position(|w| w == b"\r\n")
                                .filter(|i| *i == 0)
                            {
                                conn.buf.advance(end + 2);
                                this.finish();
                                return Poll::Ready(None);
                            }
                            if let Some(i) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let block = conn.buf.split_to(i + 4);
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
                                this.finish();
                                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                            }
                        }
                    }
                    match ready!(poll_fill(conn, cx)) {
                        Ok(0) => return Poll::Ready(Some(Err(eof()))),
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
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
