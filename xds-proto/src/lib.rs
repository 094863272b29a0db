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
/// Envoy's packages, nested as the generated code expects.
#[allow(clippy::all, missing_docs)]
pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
}

/// Istio's certificate API (`istio.v1.auth.IstioCertificateService`).
#[allow(clippy::all, missing_docs)]
pub mod istio {
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}
pub use istio::v1::auth as ca;

/// `google.rpc.Status`, carried in NACKs.
#[allow(clippy::all, missing_docs)]
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// `envoy.config.core.v3`: the Node a proxy identifies itself with.
pub use envoy::config::core::v3 as core;
/// Envoy's discovery protocol (`envoy.service.discovery.v3`), the transport.
pub use envoy::service::discovery::v3 as discovery;
pub use google::rpc;

pub use prost;

/// `google.protobuf.Any`, with its payload in [`bytes::Bytes`]: a resource
/// encoded once is shared by every stream that sends it instead of being
/// copied into each response.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Any {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: bytes::Bytes,
}
pub use prost_types;

/// Ends the nonce of the last response of a delta push from `bosun
/// control`, which sends only the types that changed: a Bosun proxy applies
/// its consistent set then. To other clients a nonce is opaque.
pub const PUSH_END: char = '!';

/// Ends the nonce of a delta response from `bosun control` that has more
/// chunks of the same type and version to follow (a large update is sent in
/// chunks of about [`CHUNK_BYTES`], so that no stream holds a buffer the
/// size of its whole config): a Bosun proxy applies nothing until the last
/// chunk. To other clients a nonce is opaque, and each chunk is an ordinary
/// incremental update.
pub const MORE: char = '+';

/// About how many bytes of resources one delta response carries.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// Type URLs of Bosun's resources, one per kind, as Envoy users know them.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/bosun.config.v1.Listener";
    pub const ROUTE_CONFIGURATION: &str = "type.googleapis.com/bosun.config.v1.RouteConfiguration";
    pub const CLUSTER: &str = "type.googleapis.com/bosun.config.v1.Cluster";
    pub const CLUSTER_LOAD_ASSIGNMENT: &str =
        "type.googleapis.com/bosun.config.v1.ClusterLoadAssignment";
    /// Node mode's one type (Services and endpoints, for nodes only).
    pub const NODE_SERVICE: &str = "type.googleapis.com/bosun.config.v1.NodeService";
    /// The order a control plane pushes them in: what is referenced first.
    pub const ALL: [&str; 4] = [
        CLUSTER,
        CLUSTER_LOAD_ASSIGNMENT,
        LISTENER,
        ROUTE_CONFIGURATION,
    ];
}

/// When and where an xDS client reconnects: the control-service addresses
/// in turn, after an exponential backoff (100 ms doubling to 10 s, each
/// wait drawn between half and all of it, so a fleet does not reconnect in
/// lockstep), reset by a stream that got a response.
pub struct Reconnect {
    addresses: Vec<String>,
    next: usize,
    backoff: std::time::Duration,
}

impl Reconnect {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX: std::time::Duration = std::time::Duration::from_secs(10);

    pub fn new(addresses: Vec<String>) -> Reconnect {
        Reconnect {
            addresses,
            next: 0,
            backoff: Self::FIRST,
        }
    }

    /// The address to try now; None when there is none.
    pub fn address(&mut self) -> Option<String> {
        let a = self
            .addresses
            .get(self.next % self.addresses.len().max(1))?;
        self.next += 1;
        Some(a.clone())
    }

    /// How long to wait after a stream ended (`got_response`: it worked
    /// for a while, so start the backoff over).
    pub fn wait(&mut self, got_response: bool) -> std::time::Duration {
        use rand::RngExt;
        if got_response {
            self.backoff = Self::FIRST;
        }
        let wait = rand::rng().random_range(self.backoff / 2..=self.backoff);
        self.backoff = (self.backoff * 2).min(Self::MAX);
        wait
    }
}
