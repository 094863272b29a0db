//! Bosun's data plane: listeners, HTTP/1.1 + h2c + gRPC + TCP proxying,
//! Istio-style routing, load balancing, metrics and access logs.
//!
//! The proxy is configured only with `bosun.config.v1` resources
//! ([`Proxy::apply`]). Each config becomes one immutable [`config::Snapshot`]
//! behind one `ArcSwap`; a request loads it once and never locks. A config
//! that cannot be applied is refused whole and the previous one keeps serving.

pub mod accesslog;
pub mod admin;
pub mod capture;
pub mod cluster;
pub mod config;
pub mod connect;
pub mod dns;
pub mod drain;
pub mod error;
pub mod flags;
pub mod freelist;
pub mod fxhash;
pub mod h1;
pub mod http;
pub mod identity;
pub mod listener;
pub mod locality;
pub mod metrics;
pub mod original_dst;
pub mod outlier;
pub mod policy;
pub mod pool;
pub mod probe;
pub mod route;
pub mod sys;
pub mod tcp;
pub mod tls;
pub mod workers;
pub mod xds;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bosun_xds_proto::config as pb;

use crate::accesslog::AccessLog;
use crate::cluster::EndpointRegistry;
use crate::config::{BuildContext, Snapshot};
use crate::drain::Drain;
use crate::error::RejectError;
use crate::identity::ProxyIdentity;
use crate::metrics::Metrics;
use crate::pool::{PoolOptions, Pools};

/// State shared by every listener and connection.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    pub identity: ProxyIdentity,
    pub endpoints: EndpointRegistry,
    pub pools: Pools,
    pub limits: Limits,
    pub drain: Arc<Drain>,
    pub access_log: Option<AccessLog>,
    pub ready: AtomicBool,
    /// DNS endpoints' addresses; the resolver task refreshes them.
    pub dns: dns::DnsCache,
    dns_wake: Arc<tokio::sync::Notify>,
    /// The workload certificate and trust bundle.
    pub tls: Arc<tls::Store>,
    /// Inbound mesh listeners' server config (reads `tls` at each handshake).
    pub mesh_server: Arc<rustls::ServerConfig>,
}

impl Shared {
    /// What building clusters reads: at config time, and for ORIGINAL_DST
    /// clusters at connection time.
    pub fn build_context(&self) -> BuildContext<'_> {
        BuildContext {
            identity: &self.identity,
            endpoints: &self.endpoints,
            pools: &self.pools,
            dns: Some(&self.dns),
            tls: &self.tls,
        }
    }

    /// The cluster a connection to `dst` uses: `c` itself, or for an
    /// ORIGINAL_DST cluster the one built for that destination. `None`: an
    /// ORIGINAL_DST cluster with no original destination (the connection
    /// was not captured) or one that could not be built.
    pub fn resolve_cluster(
        &self,
        c: &Arc<cluster::Cluster>,
        dst: Option<SocketAddr>,
    ) -> Option<Arc<cluster::Cluster>> {
        let Some(od) = &c.original_dst else {
            return Some(c.clone());
        };
        match config::original_dst_cluster(od, dst?, &self.build_context()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::debug!(cluster = %c.name, error = %e, "original destination refused");
                None
            }
        }
    }
}

/// The proxy's limits, each a flag of `bosun proxy` (defaults as Envoy's
/// and nginx's users expect; README lists them).
#[derive(Debug, Clone)]
pub struct Limits {
    /// A request head must arrive within this of accept (the first) or of
    /// its first byte (later ones, HTTP/1.1). nginx: 60 s.
    pub request_head_timeout: Duration,
    /// A downstream connection with no request in flight and none started
    /// for this long is closed (looked at once per period: after one to two).
    pub idle_timeout: Duration,
    /// Request head bytes (request line and headers); over it: 431. Envoy: 60 KiB.
    pub max_request_head_bytes: usize,
    /// Request headers; over it: 431. Envoy: 100.
    pub max_request_headers: usize,
    /// Concurrent downstream connections per listener; at the limit the
    /// listener stops accepting until one closes.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per downstream connection.
    pub max_concurrent_streams: u32,
    /// An upstream that sends nothing for this long fails the request (504
    /// `SI`). Envoy's stream idle timeout: 5 min.
    pub stream_idle_timeout: Duration,
    /// Idle upstream connections are closed after this.
    pub upstream_idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// DNS endpoint names are looked up again at least this often.
    pub dns_refresh_rate: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_head_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_request_head_bytes: 60 * 1024,
            max_request_headers: 100,
            max_connections: 10_000,
            max_concurrent_streams: 1024,
            stream_idle_timeout: Duration::from_secs(300),
            upstream_idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            dns_refresh_rate: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    pub identity: ProxyIdentity,
    pub access_log: bool,
    pub limits: Limits,
    /// The workload certificate (empty: no mTLS until one arrives).
    pub tls: Arc<tls::Store>,
    /// Worker threads serving connections (see `workers`); 1: the
    /// caller's runtime serves them.
    pub workers: usize,
}

/// A running proxy. Cheap to share; `apply` may be called from any task.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: listener::Listeners,
    apply_lock: Mutex<()>,
}

impl Proxy {
    /// Must be called inside a tokio runtime (which runs the DNS loop,
    /// and the listeners too with one worker). Fails if a worker thread
    /// cannot be started.
    pub fn new(opts: ProxyOptions) -> std::io::Result<Arc<Proxy>> {
        let workers = workers::Workers::start(opts.workers)?;
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::empty(&opts.identity)),
            metrics: Metrics::per_worker(workers.count()),
            identity: opts.identity,
            endpoints: EndpointRegistry::default(),
            pools: Pools::per_worker(
                PoolOptions::new(
                    opts.limits.connect_timeout,
                    opts.limits.upstream_idle_timeout,
                ),
                workers.count(),
            ),
            limits: opts.limits,
            drain: Arc::new(Drain::default()),
            access_log: opts.access_log.then_some(AccessLog),
            ready: AtomicBool::new(false),
            dns: dns::DnsCache::default(),
            dns_wake: Arc::new(tokio::sync::Notify::new()),
            mesh_server: tls::mesh_server_config(&opts.tls),
            tls: opts.tls,
        });
        let proxy = Arc::new(Proxy {
            shared,
            listeners: listener::Listeners::new(workers),
            apply_lock: Mutex::new(()),
        });
        tokio::spawn(dns_loop(
            Arc::downgrade(&proxy),
            proxy.shared.dns_wake.clone(),
        ));
        Ok(proxy)
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
        if self.shared.drain.is_draining() {
            // Listeners are closed for good: a new config must not reopen them.
            return Ok(());
        }
        let version = cfg.version.clone();
        let ctx = self.shared.build_context();
        let has_dns = cfg
            .clusters
            .iter()
            .any(|c| c.dns != pb::DnsLookup::None as i32);
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
        if has_dns {
            self.shared.dns_wake.notify_one();
        }
        tracing::info!(%version, "config applied");
        Ok(())
    }

    /// Builds the current config again (DNS answers changed). Under the
    /// apply lock, so a config applied meanwhile is never replaced by an
    /// older one.
    pub fn rebuild(&self) -> Result<(), RejectError> {
        let _g = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.shared.snapshot.load_full();
        self.apply_locked(current.source.clone())
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

    /// Graceful drain: stop accepting, `/ready` 503, `Connection: close` and
    /// GOAWAY, then wait for in-flight work up to `window`. True when
    /// everything finished in time.
    pub async fn drain(&self, window: Duration) -> bool {
        let drain = &self.shared.drain;
        drain.start();
        self.listeners.close_all();
        let active = drain.active();
        tracing::info!(connections = active, ?window, "draining");
        let done = drain.wait(window).await;
        if done {
            tracing::info!("drained");
        } else {
            tracing::warn!(
                connections = drain.active(),
                "drain window over with work still running"
            );
        }
        done
    }
}

/// Resolves the names of DNS endpoints when a config brings new ones and
/// then every cluster's refresh interval; a changed answer rebuilds the
/// snapshot from the config last applied. Ends with the proxy.
async fn dns_loop(proxy: std::sync::Weak<Proxy>, wake: Arc<tokio::sync::Notify>) {
    use std::collections::BTreeMap;
    use tokio::time::Instant;
    let mut due: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let next = {
            let Some(p) = proxy.upgrade() else {
                return;
            };
            let source = p.shared.snapshot.load_full();
            let mut names = dns::names(&source.source);
            for every in names.values_mut() {
                *every = (*every).min(p.shared.limits.dns_refresh_rate);
            }
            p.shared.dns.retain(&names);
            due.retain(|k, _| names.contains_key(k));
            let mut changed = false;
            for (name, every) in &names {
                let now = Instant::now();
                if due.get(name).is_none_or(|t| *t <= now) {
                    match p.shared.dns.refresh(name).await {
                        dns::Refresh::Changed => changed = true,
                        dns::Refresh::Same => {}
                        dns::Refresh::Failed => {
                            p.shared
                                .metrics
                                .dns_failures
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    due.insert(name.clone(), now + *every);
                }
            }
            if changed && let Err(e) = p.rebuild() {
                tracing::warn!(error = %e, "DNS answer changed but the config could not be rebuilt");
            }
            due.values().min().copied()
        };
        match next {
            Some(t) => {
                tokio::select! {
                    () = tokio::time::sleep_until(t) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}
