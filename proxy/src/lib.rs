//! Bosun's data plane: listeners, HTTP/1.1 + h2c + gRPC + TCP proxying,
//! Istio-style routing, load balancing, metrics and access logs.
//!
//! The proxy is configured only with `bosun.config.v1` resources
//! ([`Proxy::apply`]). Each config becomes one immutable [`config::Snapshot`]
//! behind one `ArcSwap`; a request loads it once and never locks. A config
//! that cannot be applied is refused whole and the previous one keeps serving.

pub mod accesslog;
pub mod admin;
pub mod cluster;
pub mod config;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod route;
pub mod tcp;
pub mod upstream;
pub mod xds;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bosun_xds_proto::config as pb;

use crate::accesslog::AccessLog;
use crate::cluster::EndpointRegistry;
use crate::config::{BuildContext, ProxyIdentity, RejectError, Snapshot};
use crate::metrics::{LabelSet, Metrics};

/// State shared by every listener and connection.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    pub identity: ProxyIdentity,
    pub endpoints: EndpointRegistry,
    pub h1: http::UpstreamClient,
    pub h2: http::UpstreamClient,
    pub access_log: Option<AccessLog>,
    pub ready: AtomicBool,
    no_route: [Arc<LabelSet>; 2],
}

impl Shared {
    pub fn no_route_labels(&self, inbound: bool) -> Arc<LabelSet> {
        self.no_route[usize::from(inbound)].clone()
    }
}

#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    pub identity: ProxyIdentity,
    pub access_log: bool,
}

/// A running proxy. Cheap to share; `apply` may be called from any task.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: listener::Listeners,
    apply_lock: Mutex<()>,
}

impl Proxy {
    /// Must be called inside a tokio runtime.
    pub fn new(opts: ProxyOptions) -> Arc<Proxy> {
        let (h1, h2) = http::clients();
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            metrics: Metrics::default(),
            no_route: [
                Arc::new(LabelSet::no_route(&opts.identity, false)),
                Arc::new(LabelSet::no_route(&opts.identity, true)),
            ],
            identity: opts.identity,
            endpoints: EndpointRegistry::default(),
            h1,
            h2,
            access_log: opts.access_log.then_some(AccessLog),
            ready: AtomicBool::new(false),
        });
        Arc::new(Proxy {
            shared,
            listeners: listener::Listeners::default(),
            apply_lock: Mutex::new(()),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Builds a snapshot from `cfg`, binds its new listeners and swaps it in.
    /// On error nothing changes: the previous config keeps serving.
    pub fn apply(&self, cfg: pb::ProxyConfig) -> Result<(), RejectError> {
        let _g = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let result = self.apply_locked(cfg);
        if let Err(e) = &result {
            self.shared
                .metrics
                .config_rejected
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "config rejected; keeping the last good config");
        }
        result
    }

    fn apply_locked(&self, cfg: pb::ProxyConfig) -> Result<(), RejectError> {
        let version = cfg.version.clone();
        let ctx = BuildContext {
            identity: &self.shared.identity,
            endpoints: &self.shared.endpoints,
        };
        let snap = Snapshot::build(cfg, &ctx)?;
        let bound = self.listeners.prepare(&snap)?;
        let snap = Arc::new(snap);
        self.shared.snapshot.store(snap.clone());
        self.listeners.commit(&self.shared, bound, &snap);
        self.shared
            .metrics
            .config_applied
            .fetch_add(1, Ordering::Relaxed);
        if let Ok(mut v) = self.shared.metrics.config_version.lock() {
            v.clone_from(&version);
        }
        self.shared.ready.store(true, Ordering::Release);
        tracing::info!(%version, "config applied");
        Ok(())
    }

    /// Counts a config refused before it reached the proxy (bad YAML).
    pub fn note_rejected(&self) {
        self.shared
            .metrics
            .config_rejected
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn version(&self) -> String {
        self.shared.snapshot.load().version.clone()
    }

    pub fn listening_on(&self) -> Vec<std::net::SocketAddr> {
        self.listeners.addresses()
    }
}
