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
    /// Plaintext xDS (ADS over gRPC, nothing authenticated): loopback by default, for a proxy
    /// on the same host and for tools. Proxies elsewhere use --xds-tls-addr.
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds_addr: SocketAddr,
    /// Be the mesh's CA, with its files in this directory (Istio's plugged-in CA names:
    /// ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem; made on first start if it has
    /// none). Serves Istio's CSR API and authenticated xDS over TLS on --xds-tls-addr.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// With --kubernetes: be the mesh's CA with its files in this Secret (Istio's
    /// istio-ca-secret layout), made on first start if it does not exist.
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        conflicts_with = "ca_dir",
        requires = "kubernetes"
    )]
    ca_secret: Option<String>,
    /// With --ca-dir or --ca-secret: xDS and the CA over TLS; every caller proves a workload
    /// identity.
    #[arg(long, default_value = "0.0.0.0:15012")]
    xds_tls_addr: SocketAddr,
    /// Bootstrap tokens for workloads outside Kubernetes: YAML `tokens: [{token, namespace,
    /// serviceAccount}]`, read at each check. With --kubernetes, ServiceAccount tokens are
    /// checked by TokenReview as well.
    #[arg(long)]
    ca_tokens: Option<PathBuf>,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The longest workload certificate lifetime a proxy may ask for (Istio's 90 days).
    #[arg(long, default_value = "2160h", value_parser = crate::parse_duration)]
    max_cert_ttl: std::time::Duration,
    /// DNS names in the control's serving certificate, comma-separated.
    #[arg(
        long,
        default_value = "bosun-control.istio-system.svc,bosun-control,istiod.istio-system.svc,localhost"
    )]
    serving_names: String,
    /// Admin: /ready, /healthz, /metrics, /debug/proxies (JSON, for `bosun status`).
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin_address: SocketAddr,
    /// With the CA: the sidecar injector, a mutating admission webhook (`POST /inject`,
    /// AdmissionReview v1 in, a JSONPatch out), over TLS with a certificate from the CA.
    #[arg(long)]
    webhook_address: Option<SocketAddr>,
    /// The image injected sidecars run.
    #[arg(long, default_value = "ghcr.io/bosun-mesh/bosun:0.1.0")]
    inject_image: String,
    /// Where injected sidecars reach this control service (xDS and CA over TLS).
    #[arg(long, default_value = "https://bosun-control.istio-system.svc:15012")]
    inject_control_address: String,
    /// With --kubernetes: the MutatingWebhookConfiguration whose caBundle the control keeps
    /// set to the mesh roots.
    #[arg(long, default_value = "bosun-sidecar-injector")]
    webhook_name: String,
    /// Injected pods start their proxy before the app (Istio's
    /// holdApplicationUntilProxyStarts); a pod's proxy.istio.io/config overrides it.
    #[arg(long)]
    inject_hold_application: bool,
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
            ca_dir: None,
            ca_secret: None,
            xds_tls_addr: "127.0.0.1:15012".parse().unwrap_or(xds_addr),
            ca_tokens: None,
            trust_domain: "cluster.local".into(),
            max_cert_ttl: std::time::Duration::from_secs(90 * 24 * 3600),
            serving_names: "bosun-control.istio-system.svc,localhost".into(),
            webhook_address: None,
            inject_image: "ghcr.io/bosun-mesh/bosun:0.1.0".into(),
            inject_control_address: "https://bosun-control.istio-system.svc:15012".into(),
            inject_hold_application: false,
            webhook_name: "bosun-sidecar-injector".into(),
        }
    }

    /// Makes it the CA too, with its files in `dir`, on `tls_addr`.
    pub fn with_ca(mut self, dir: PathBuf, tls_addr: SocketAddr, tokens: PathBuf) -> ControlArgs {
        self.ca_dir = Some(dir);
        self.xds_tls_addr = tls_addr;
        self.ca_tokens = Some(tokens);
        self
    }
}

/// Binds the xDS and admin listeners and starts the source; returns once
/// they listen, with everything running in the background.
pub async fn start(args: &ControlArgs) -> anyhow::Result<Running> {
    let (tx, rx) = watch::channel::<Option<Arc<Prepared>>>(None);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let ads = Ads::new(rx.clone()).with_shutdown(shutdown_rx.clone());
    // Checked before anything listens: a bad CA directory or tokens file
    // stops the start with the file named.
    if args.webhook_address.is_some() && args.ca_dir.is_none() && args.ca_secret.is_none() {
        anyhow::bail!(
            "--webhook-address needs the CA (--ca-dir or --ca-secret) for its certificate"
        );
    }
    let tls = if args.ca_dir.is_some() || args.ca_secret.is_some() {
        Some(ca_server(args, &ads).await?)
    } else {
        None
    };
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
    if let Some((incoming, ads_tls, ca)) = tls {
        let mut stop = shutdown_rx.clone();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(ads_tls.into_service())
                .add_service(ca.into_service())
                .serve_with_incoming_shutdown(incoming, async move {
                    if stop.wait_for(|s| *s).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "xDS/CA TLS server stopped");
            }
        });
    }
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

type TlsIncoming = tokio_stream::wrappers::ReceiverStream<
    Result<bosun_control::identity::TlsConn, std::io::Error>,
>;

/// The CA and the authenticated xDS listener: loads (or makes) the CA,
/// issues the serving certificate, binds --xds-tls-addr.
async fn ca_server(
    args: &ControlArgs,
    ads: &Ads,
) -> anyhow::Result<(TlsIncoming, Ads, bosun_control::ca::CaService)> {
    use bosun_control::{ca, identity};
    let mut authority = match (&args.ca_dir, &args.ca_secret) {
        (Some(dir), _) => {
            ca::Ca::load_or_create(dir, &args.trust_domain).map_err(anyhow::Error::msg)?
        }
        (None, Some(secret)) => {
            let files = bosun_control::kubernetes::ca_from_secret(secret, &args.trust_domain)
                .await
                .map_err(anyhow::Error::msg)?;
            ca::Ca::from_pems(files, &format!("Secret {secret}")).map_err(anyhow::Error::msg)?
        }
        (None, None) => anyhow::bail!("the CA needs --ca-dir or --ca-secret"),
    };
    authority.max_ttl = args.max_cert_ttl;
    let auth = identity::Authenticator::new(args.trust_domain.clone(), args.ca_tokens.clone())
        .map_err(anyhow::Error::msg)?;
    let auth = if args.kubernetes {
        auth.with_ambient_kubernetes()
            .await
            .map_err(anyhow::Error::msg)?
    } else {
        auth
    };
    let auth = Arc::new(auth);
    let names: Vec<String> = args
        .serving_names
        .split(',')
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    let (chain, key) = authority
        .serving(&names, std::time::Duration::from_secs(365 * 24 * 3600))
        .map_err(anyhow::Error::msg)?;
    let config =
        identity::server_config(&chain, &key, authority.roots_pem()).map_err(anyhow::Error::msg)?;
    if let Some(addr) = args.webhook_address {
        let mut web = (*config).clone();
        web.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("webhook listener {addr}: {e}"))?;
        tracing::info!(%addr, "sidecar injector (admission webhook) listening");
        let opts = bosun_control::inject::InjectOptions {
            image: args.inject_image.clone(),
            control_address: args.inject_control_address.clone(),
            control_name: names.first().cloned().unwrap_or_default(),
            trust_domain: args.trust_domain.clone(),
            hold_application: args.inject_hold_application,
        };
        tokio::spawn(bosun_control::webhook::serve(listener, Arc::new(web), opts));
    }
    if args.kubernetes {
        // What injected pods mount (istio-ca-root-cert in every namespace),
        // and the webhook's caBundle.
        tokio::spawn(bosun_control::kubernetes::publish_roots(
            authority.roots_pem().to_string(),
            args.webhook_address.map(|_| args.webhook_name.clone()),
            std::time::Duration::from_secs(60),
        ));
    }
    let listener = tokio::net::TcpListener::bind(args.xds_tls_addr)
        .await
        .map_err(|e| anyhow::anyhow!("xDS/CA TLS listener {}: {e}", args.xds_tls_addr))?;
    tracing::info!(addr = %args.xds_tls_addr, ca = %authority.dir.display(), "xDS and CA listening (TLS, authenticated)");
    let service = ca::CaService {
        ca: Arc::new(authority),
        auth: auth.clone(),
        issued: Arc::default(),
    };
    Ok((
        identity::incoming(listener, config),
        ads.clone().with_auth(auth),
        service,
    ))
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
        "{:<40} {:<48} {:<6} {:<18} {:<18} {:<8} LAST NACK",
        "NODE", "IDENTITY", "STREAM", "ACKED", "LATEST", "SYNCED"
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
        let identity = match s("identity") {
            i if i.is_empty() => "-".to_string(),
            i => i,
        };
        println!(
            "{:<40} {:<48} {:<6} {:<18} {:<18} {:<8} {}",
            s("node_id"),
            identity,
            s("stream"),
            s("acked_version"),
            s("latest_version"),
            synced,
            nack
        );
    }
    Ok(ExitCode::SUCCESS)
}
