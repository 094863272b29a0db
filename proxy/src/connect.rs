//! The one connector: every upstream connection (HTTP/1.1, HTTP/2, TCP,
//! upgrades) is opened here, and comes back as a [`Stream`]: plain TCP, or
//! TLS (Istio mutual TLS to a mesh peer, or a DestinationRule's SIMPLE or
//! MUTUAL origination).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use std::sync::Arc;

use crate::error::ConnectError;
use crate::pool::Keepalive;
use crate::tls::Alpn;
use crate::tls::origin::Origin;

/// An open upstream connection.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// What a pooled connection carries besides its endpoint. Connections are
/// reused only for the same endpoint *and* transport: after mTLS, one made
/// for one identity must never serve another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    Plaintext,
    Tls(Arc<Origin>),
}

/// Opens a connection to `addr` within `timeout` (TLS handshake
/// included), with TCP keepalive when asked; `alpn` says what it will
/// carry, for the ALPN a TLS connection offers.
pub async fn connect(
    addr: SocketAddr,
    transport: &Transport,
    timeout: Duration,
    keepalive: Option<&Keepalive>,
    alpn: Alpn,
) -> Result<Stream, ConnectError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))??;
    let _ = stream.set_nodelay(true);
    if let Some(k) = keepalive {
        let mut ka = socket2::TcpKeepalive::new();
        if !k.time.is_zero() {
            ka = ka.with_time(k.time);
        }
        if !k.interval.is_zero() {
            ka = ka.with_interval(k.interval);
        }
        if k.probes > 0 {
            ka = ka.with_retries(k.probes);
        }
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka) {
            tracing::debug!(%addr, error = %e, "setting TCP keepalive failed");
        }
    }
    match transport {
        Transport::Plaintext => Ok(Stream::Plain(stream)),
        Transport::Tls(origin) => {
            let connector = tokio_rustls::TlsConnector::from(origin.config(alpn));
            let tls = tokio::time::timeout_at(
                deadline,
                connector.connect(origin.server_name.clone(), stream),
            )
            .await
            .map_err(|_| ConnectError::Timeout(timeout))?
            .map_err(ConnectError::Tls)?;
            Ok(Stream::Tls(Box::new(tls)))
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl crate::h1::Peek for Stream {
    fn peek_idle(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self {
            // tokio's readiness says whether anything arrived; nothing is
            // registered (a poll would leave a waker with the socket).
            Stream::Plain(s) => match s.try_read(buf) {
                Ok(n) => Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            // rustls may hold decrypted bytes already read from the socket.
            Stream::Tls(s) => crate::h1::peek_by_poll(s.as_mut(), buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
