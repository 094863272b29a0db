//! The HTTP request path, as stages:
//!
//! - [`serve`]: one task per downstream connection: protocol detection,
//!   limits, idle close, drain; one `handle` per request.
//! - [`lean`]: the HTTP/1.1 server path for simple requests, in the
//!   connection's task; hyper serves the rest of a connection after the
//!   first request that is not simple.
//! - [`decide`]: pure: snapshot + connection + request head → a local reply
//!   or a forward plan.
//! - [`forward`]: the upstream stack: endpoint pick, upstream headers, the
//!   pool and connector, the response.
//! - [`body`]: request and response bodies; metrics and the access log when
//!   a response ends.
//!
//! ARCHITECTURE.md draws the phases.

pub mod body;
pub mod decide;
pub mod forward;
pub mod headers;
pub mod lean;
pub mod serve;

pub use serve::serve_connection;
