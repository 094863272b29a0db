//! `bosun control` and `bosun status`.
//!
//! The control service watches a config directory, checks every change as
//! every proxy will see it, and publishes only valid configs to the ADS
//! server; an invalid change is refused (logged with file, resource and
//! field, counted) and proxies keep the last good one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bosun_control::translate::Prepared;
use bosun_control::xds::{Ads, Registry};
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::watch;

#[derive(clap::Args, Debug, Clone)]
pub struct ControlArgs {
    /// A directory (or file) of Istio and Kubernetes YAML; watched.
    #[arg(long, conflicts_with_all = ["etcd", "kubernetes"], required_unless_present_any = ["etcd", "kubernetes"])]
    config_dir: Option<PathBuf>,
    /// An etcd (v3, `http://host:port`) holding one resource per key under --etcd-prefix; watched.
    #[arg(long, conflicts_with = "kubernetes")]
    etcd: Option<String>,
    /// Watch the Kubernetes API (in-cluster service account, or KUBECONFIG) for Istio
    /// networking resources, Services, EndpointSlices and Pods.
    #[arg(long)]
    kubernetes: bool,
    /// Keys are <prefix>/<kind>/<namespace>/<name>; values are YAML or JSON documents.
    #[arg(long, default_value = "/bosun")]
    etcd_prefix: String,
    /// Where proxies connect for xDS (ADS over gRPC, plaintext).
    #[arg(long, default_value = "0.0.0.0:15010")]
    xds_addr: SocketAddr,
    /// Admin: /ready, /healthz, /metrics, /debug/proxies (JSON, for `bosun status`).
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin_address: SocketAddr,
}

#[derive(Default)]
struct Counters {
    applied: AtomicU64,
    rejected: AtomicU64,
}

pub async fn run(args: ControlArgs) -> anyhow::Result<ExitCode> {
    let mut signals = crate::Signals::new()?;
    let running = start(&args).await?;
    signals.recv().await;
    tracing::info!("shutting down: ending xDS streams so proxies move to another replica");
    tokio::select! {
        _ = running.stop() => {}
        _ = signals.recv() => tracing::warn!("second signal: exiting now"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A started control service.
pub struct Running {
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, ends every ADS stream with UNAVAILABLE (proxies
    /// fail over at once) and waits, briefly, for the server to finish.
    pub async fn stop(self) {
        self.shutdown.send_replace(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.server).await;
    }
}

impl ControlArgs {
    /// A control service on a config directory (the demo runs one in-process).
    pub fn new(
        config_dir: PathBuf,
        xds_addr: SocketAddr,
        admin_address: SocketAddr,
    ) -> ControlArgs {
        ControlArgs {
            config_dir: Some(config_dir),
            etcd: None,
            kubernetes: false,
            etcd_prefix: "/bosun".into(),
            xds_addr,
            admin_address,
        }
    }
}

/// Binds the xDS and admin listeners and starts the source; returns once
/// they listen, with everything running in the background.
pub async fn start(args: &ControlArgs) -> anyhow::Result<Running> {
    let (tx, rx) = watch::channel::<Option<Arc<Prepared>>>(None);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let ads = Ads::new(rx.clone()).with_shutdown(shutdown_rx.clone());
    let registry = ads.registry.clone();
    let counters = Arc::new(Counters::default());

    let mut readings = match (&args.config_dir, &args.etcd) {
        (Some(dir), _) => bosun_control::source::watch(dir.clone()),
        (None, Some(etcd)) => {
            let endpoint = if etcd.contains("://") {
                etcd.clone()
            } else {
                format!("http://{etcd}")
            };
            let prefix = format!("{}/", args.etcd_prefix.trim_end_matches('/'));
            bosun_control::etcd::watch(endpoint, prefix)
        }
        (None, None) if args.kubernetes => bosun_control::kubernetes::watch()
            .await
            .map_err(anyhow::Error::msg)?,
        (None, None) => anyhow::bail!("give --config-dir DIR, --etcd URL or --kubernetes"),
    };
    let c = counters.clone();
    tokio::spawn(async move {
        // The last accepted config: a reading that differs from it only in
        // endpoints is prepared from it (Istio's incremental EDS push).
        let mut last: Option<Arc<Prepared>> = None;
        while let Some(reading) = readings.recv().await {
            let t = std::time::Instant::now();
            let checked = reading.and_then(|cfg| {
                let prepared = match &last {
                    Some(prev) => Prepared::update(prev, cfg),
                    None => Prepared::new(cfg),
                };
                prepared.check().map(|()| prepared)
            });
            match checked {
                Ok(cfg) => {
                    c.applied.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        check_ms = t.elapsed().as_millis() as u64,
                        endpoints_only = cfg.endpoint_update().is_some(),
                        "config accepted; pushing to proxies"
                    );
                    let cfg = Arc::new(cfg);
                    last = Some(cfg.clone());
                    tx.send_replace(Some(cfg));
                }
                Err(errors) => {
                    c.rejected.fetch_add(1, Ordering::Relaxed);
                    for e in &errors.0 {
                        tracing::error!("config refused, proxies keep the last good config: {e}");
                    }
                }
            }
        }
    });

    let admin = tokio::net::TcpListener::bind(args.admin_address)
        .await
        .map_err(|e| anyhow::anyhow!("admin listener {}: {e}", args.admin_address))?;
    tokio::spawn(serve_admin(admin, registry, counters, rx));

    let incoming = tokio::net::TcpListener::bind(args.xds_addr)
        .await
        .map_err(|e| anyhow::anyhow!("xDS listener {}: {e}", args.xds_addr))?;
    tracing::info!(addr = %args.xds_addr, "xDS (ADS) listening");
    let mut stop = shutdown_rx;
    let server = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(ads.into_service())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(incoming),
                async move {
                    if stop.wait_for(|s| *s).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                },
            )
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "xDS server stopped");
        }
    });
    Ok(Running { shutdown, server })
}

async fn serve_admin(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    counters: Arc<Counters>,
    config: watch::Receiver<Option<Arc<Prepared>>>,
) {
    bosun_control::admin::serve(listener, move |path| match path {
        "/healthz" => (200, "ok\n".to_string()),
        "/ready" if config.borrow().is_some() => (200, "ready\n".to_string()),
        "/ready" => (503, "no valid config yet\n".to_string()),
        "/debug/proxies" => (
            200,
            serde_json::to_string_pretty(&registry.snapshot()).unwrap_or_default(),
        ),
        "/metrics" | "/stats/prometheus" => (
            200,
            format!(
                "# TYPE bosun_control_config_accepted_total counter\nbosun_control_config_accepted_total {}\n# TYPE bosun_control_config_rejected_total counter\nbosun_control_config_rejected_total {}\n# TYPE bosun_control_connected_proxies gauge\nbosun_control_connected_proxies {}\n",
                counters.applied.load(Ordering::Relaxed),
                counters.rejected.load(Ordering::Relaxed),
                registry.snapshot().len()
            ),
        ),
        _ => (
            404,
            "control admin: /ready /healthz /metrics /debug/proxies\n".to_string(),
        ),
    })
    .await
}

/// `bosun status`: like `istioctl proxy-status`.
pub async fn status(control: &str) -> anyhow::Result<ExitCode> {
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let uri: hyper::Uri = format!("http://{control}/debug/proxies").parse()?;
    let resp = client
        .get(uri)
        .await
        .map_err(|e| anyhow::anyhow!("control service at {control}: {e}"))?;
    let body = resp.into_body().collect().await?.to_bytes();
    let proxies: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
    println!(
        "{:<40} {:<6} {:<18} {:<18} {:<8} LAST NACK",
        "NODE", "STREAM", "ACKED", "LATEST", "SYNCED"
    );
    for p in &proxies {
        let s = |k: &str| p[k].as_str().unwrap_or("").to_string();
        let synced = if s("acked_version") == s("latest_version") && !s("latest_version").is_empty()
        {
            "SYNCED"
        } else {
            "STALE"
        };
        let nack = p["last_nack"]
            .as_str()
            .or(p["translate_error"].as_str())
            .unwrap_or("-");
        println!(
            "{:<40} {:<6} {:<18} {:<18} {:<8} {}",
            s("node_id"),
            s("stream"),
            s("acked_version"),
            s("latest_version"),
            synced,
            nack
        );
    }
    Ok(ExitCode::SUCCESS)
}
