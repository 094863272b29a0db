//! Bosun's protobuf messages: `bosun.config.v1` (the resources a proxy is
//! configured with) and `bosun.testing.v1` (an echo service for tests).
//! Compiled at build time with protox, so no system `protoc` is needed.

/// `bosun.config.v1`: listeners, routes, clusters and endpoints.
pub mod config {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("bosun.config.v1");
}

/// `bosun.testing.v1`: the echo service used by tests and the demo.
pub mod testing {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("bosun.testing.v1");
}
pub use prost;
