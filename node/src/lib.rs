//! Node mode: Bosun in place of kube-proxy. Services and EndpointSlices
//! (and DestinationRule subset splits) become nftables rules in table
//! `ip bosun`, or iptables chains `BOSUN-*`, updated as the config changes.

pub mod iptables;
pub mod netlink;
pub mod nft;
pub mod rule;
pub use bosun_control::node_services as services;
pub mod sync;
pub mod userspace;
pub mod xds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

pub use sync::{Backend, Metrics, Syncer};

/// How node mode runs.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Where Services come from: a watched YAML path, or a control service.
    pub source: Source,
    pub node_name: String,
    pub backend: Backend,
    pub cluster_cidr: Option<String>,
    /// kube-proxy's health check: `/healthz` (and `/livez`).
    pub healthz_address: SocketAddr,
    /// Prometheus metrics: `/metrics`.
    pub metrics_address: SocketAddr,
    /// On stop, how long the userspace backend's connections may finish.
    pub drain: Duration,
}

/// Where node mode reads Services and EndpointSlices.
#[derive(Clone, Debug)]
pub enum Source {
    /// A YAML file or directory, watched.
    Config(PathBuf),
    /// `NodeService` resources over ADS from `bosun control`.
    Xds(xds::XdsOptions),
}

/// Service maps from the source, or the errors that refused a reading.
fn service_maps(
    source: Source,
    node_name: String,
) -> mpsc::Receiver<Result<services::ServiceMap, Vec<String>>> {
    let (tx, rx) = mpsc::channel(4);
    match source {
        Source::Config(path) => {
            let mut readings = bosun_control::source::watch(path);
            tokio::spawn(async move {
                while let Some(reading) = readings.recv().await {
                    let r = reading
                        .and_then(|cfg| services::service_map(&cfg, &node_name))
                        .map_err(|errors| errors.0.iter().map(|e| e.to_string()).collect());
                    if tx.send(r).await.is_err() {
                        return;
                    }
                }
            });
        }
        Source::Xds(opts) => {
            let mut maps = xds::watch(opts);
            tokio::spawn(async move {
                while let Some(map) = maps.recv().await {
                    if tx.send(Ok(map)).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
    rx
}

/// Serves `/healthz` like kube-proxy: 200 with the last sync time once
/// rules were programmed, 503 before.
async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, node: String) {
    bosun_control::admin::serve(listener, move |path| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        match path {
            "/healthz" | "/livez" => match metrics.last_sync() {
                Some(t) => (
                    200,
                    format!(
                        "{{\"lastUpdated\": {t:.3}, \"currentTime\": {now:.3}, \"nodeName\": \"{node}\", \"nodeEligible\": true}}\n"
                    ),
                ),
                None => (
                    503,
                    format!(
                        "{{\"lastUpdated\": null, \"currentTime\": {now:.3}, \"nodeName\": \"{node}\"}}\n"
                    ),
                ),
            },
            "/metrics" => (200, metrics.render()),
            _ => (404, "node mode: /healthz /livez /metrics\n".to_string()),
        }
    })
    .await
}

/// Runs node mode until `stop` resolves, then removes its rules.
pub async fn run(
    opts: NodeOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let mut syncer = Syncer::new(
        opts.backend,
        nft::Options {
            cluster_cidr: opts.cluster_cidr.clone(),
        },
    );
    for addr in [opts.healthz_address, opts.metrics_address] {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("listener {addr}: {e}"))?;
        tokio::spawn(serve(l, syncer.metrics.clone(), opts.node_name.clone()));
    }
    let mut readings = service_maps(opts.source.clone(), opts.node_name.clone());
    let mut current: Option<services::ServiceMap> = None;
    let mut changed_at = Instant::now();
    let mut retry = false;
    // When an uneven split (endpoints gone, rules kept) is made exact:
    // within a second of the first sync that left it, whatever follows.
    let mut even_out: Option<tokio::time::Instant> = None;
    tokio::pin!(stop);
    loop {
        let mut exact = false;
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep_until(even_out.unwrap_or_else(tokio::time::Instant::now)), if even_out.is_some() => {
                exact = true;
            }
            r = readings.recv() => {
                let Some(reading) = r else { break };
                changed_at = Instant::now();
                match reading {
                    Ok(map) => current = Some(map),
                    Err(errors) => {
                        for e in &errors {
                            tracing::error!("config refused, the rules in place stay: {e}");
                        }
                        continue;
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
        }
        if let Some(map) = &current {
            let synced = if exact {
                syncer.sync_exact(map, changed_at).await
            } else {
                syncer.sync(map, changed_at).await
            };
            match synced {
                Ok(_) => {
                    retry = false;
                    even_out = match (syncer.skewed(), even_out) {
                        (false, _) => None,
                        (true, Some(t)) => Some(t),
                        (true, None) => Some(tokio::time::Instant::now() + Duration::from_secs(1)),
                    };
                }
                Err(e) => {
                    tracing::error!(error = %e, "sync failed; a full resync follows in 1 s");
                    retry = true;
                }
            }
        }
    }
    tracing::info!("removing node rules");
    syncer.shutdown(opts.drain).await
}
