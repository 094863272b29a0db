//! Errors: [`RejectError`] for a config the proxy refuses (it becomes a
//! NACK or a logged refusal), [`ForwardError`] for a request that could not
//! be forwarded (it becomes a local reply with Envoy's status and flag).

use std::io;

use http::StatusCode;

use crate::flags::Flags;

/// Why a config was refused: which resource and field, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{resource}: {field}: {message}")]
pub struct RejectError {
    pub resource: String,
    pub field: String,
    pub message: String,
}

pub fn reject(
    resource: impl Into<String>,
    field: impl Into<String>,
    message: impl Into<String>,
) -> RejectError {
    RejectError {
        resource: resource.into(),
        field: field.into(),
        message: message.into(),
    }
}

/// Why opening a connection to an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("connect: {0}")]
    Io(#[from] io::Error),
    /// The TLS handshake failed (certificate refused, no common protocol).
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
}

/// Why a request could not be forwarded, or its response not read.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The upstream closed or reset the connection before the response head.
    #[error("upstream reset: {0}")]
    Reset(io::Error),
    /// The upstream's response could not be parsed.
    #[error("upstream protocol error: {0}")]
    UpstreamProtocol(&'static str),
    /// The upstream sent nothing for the stream idle timeout.
    #[error("upstream sent nothing for {0:?}")]
    StreamIdle(std::time::Duration),
    /// The try's time (route timeout, per-try timeout) ran out.
    #[error("upstream request timeout")]
    TryTimeout,
    /// The client stopped sending its request body (not the upstream's fault).
    #[error("client sent nothing of its body for {0:?}")]
    DownstreamStalled(std::time::Duration),
    /// The client's request body was malformed (bad chunked framing).
    #[error("malformed request body: {0}")]
    DownstreamBody(String),
    /// The client went away while its request body was being forwarded.
    #[error("client went away: {0}")]
    DownstreamGone(String),
    /// HTTP/2 or upgrade client error (hyper's client connection).
    #[error("upstream: {0}")]
    Hyper(#[from] hyper::Error),
}

impl ForwardError {
    /// A failure reading the client's request body: the client went away
    /// (its connection closed or the stream was cancelled), or its framing
    /// was bad.
    pub fn downstream<E: std::error::Error + 'static>(e: &E) -> ForwardError {
        let gone = (e as &dyn std::error::Error)
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message() || h.is_canceled() || h.is_closed());
        if gone {
            ForwardError::DownstreamGone(e.to_string())
        } else {
            ForwardError::DownstreamBody(e.to_string())
        }
    }
}

const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
const TERMINATION: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";

impl ForwardError {
    /// The local reply Envoy sends for this error: status, flag and body.
    pub fn reply(&self) -> (StatusCode, Flags, &'static str) {
        match self {
            ForwardError::Connect(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Flags::UpstreamConnectFailure,
                CONNECT_FAILURE,
            ),
            ForwardError::Reset(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Flags::UpstreamConnectionTermination,
                TERMINATION,
            ),
            ForwardError::Hyper(e) if e.is_timeout() => (
                StatusCode::GATEWAY_TIMEOUT,
                Flags::StreamIdleTimeout,
                "stream timeout",
            ),
            ForwardError::Hyper(e) if e.is_parse() => (
                StatusCode::BAD_GATEWAY,
                Flags::UpstreamProtocolError,
                "upstream sent an invalid response",
            ),
            ForwardError::Hyper(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Flags::UpstreamConnectionTermination,
                TERMINATION,
            ),
            ForwardError::UpstreamProtocol(_) => (
                StatusCode::BAD_GATEWAY,
                Flags::UpstreamProtocolError,
                "upstream sent an invalid response",
            ),
            ForwardError::StreamIdle(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                Flags::StreamIdleTimeout,
                "stream timeout",
            ),
            ForwardError::DownstreamStalled(_) => (
                StatusCode::REQUEST_TIMEOUT,
                Flags::StreamIdleTimeout,
                "stream timeout",
            ),
            ForwardError::TryTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                Flags::UpstreamRequestTimeout,
                "upstream request timeout",
            ),
            ForwardError::DownstreamBody(_) => (
                StatusCode::BAD_REQUEST,
                Flags::DownstreamProtocolError,
                "malformed request body",
            ),
            ForwardError::DownstreamGone(_) => (
                StatusCode::BAD_REQUEST,
                Flags::DownstreamConnectionTermination,
                "",
            ),
        }
    }
}
