//! Composition root: config source → validation/translation → proxy.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bosun_control::translate::{ProxyMode, ProxyParams};
use bosun_proxy::identity::ProxyIdentity;
use bosun_proxy::{Proxy, ProxyOptions};
use bosun_xds_proto::prost_types::{Struct, Value, value::Kind};

use crate::{Mode, ProxyArgs, parse_labels};

pub fn params(args: &ProxyArgs) -> anyhow::Result<ProxyParams> {
    let labels = match (&args.labels, args.mode) {
        (Some(l), _) => parse_labels(l)?,
        (None, _) if let Some(path) = &args.labels_file => labels_file(path)?,
        (None, Mode::Gateway) => parse_labels("istio=ingressgateway")?,
        (None, Mode::Sidecar | Mode::Node) => Default::default(),
    };
    Ok(ProxyParams {
        mode: match args.mode {
            Mode::Sidecar => ProxyMode::Sidecar,
            Mode::Gateway => ProxyMode::Gateway,
            Mode::Node => anyhow::bail!("node mode does not run the HTTP proxy"),
        },
        namespace: args.namespace.clone(),
        labels,
        outbound_address: args.outbound_address.ip().to_string(),
        outbound_port: u32::from(args.outbound_address.port()),
        inbound: if args.capture {
            Some((
                args.inbound_address.ip().to_string(),
                u32::from(args.inbound_address.port()),
                0,
            ))
        } else {
            args.app_port.map(|app| {
                (
                    args.inbound_address.ip().to_string(),
                    u32::from(args.inbound_address.port()),
                    u32::from(app),
                )
            })
        },
        gateway_address: args.gateway_address.clone(),
        check_only: false,
        trust_domain: args.trust_domain.clone(),
        capture: args.capture,
    })
}

/// Labels in the downward API's file format: `key="value"` per line,
/// values quoted as Go quotes them.
fn labels_file(path: &Path) -> anyhow::Result<bosun_control::model::Labels> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = bosun_control::model::Labels::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || anyhow::anyhow!("{}:{}: want key=\"value\"", path.display(), i + 1);
        let (k, v) = line.split_once('=').ok_or_else(bad)?;
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .ok_or_else(bad)?;
        let mut val = String::new();
        let mut chars = v.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('n') => val.push('\n'),
                    Some('t') => val.push('\t'),
                    Some(o) => val.push(o),
                    None => return Err(bad()),
                }
            } else {
                val.push(c);
            }
        }
        out.insert(k.trim().to_string(), val);
    }
    Ok(out)
}

/// Where the workload certificate comes from: files (--cert-dir), the CA
/// (--ca-address, or an https:// --xds), or nowhere (no mTLS).
fn start_identity(args: &ProxyArgs, store: &Arc<bosun_proxy::tls::Store>) -> anyhow::Result<()> {
    use bosun_proxy::tls;
    if let Some(dir) = &args.cert_dir {
        tls::source::watch(dir.clone(), store.clone()).map_err(anyhow::Error::msg)?;
        return Ok(());
    }
    let ca = args.ca_address.clone().or_else(|| {
        args.xds
            .as_ref()
            .and_then(|x| x.split(',').next())
            .map(|a| a.trim().to_string())
            .filter(|a| a.starts_with("https://"))
    });
    let Some(address) = ca else {
        return Ok(());
    };
    let (Some(root), Some(token)) = (&args.ca_root_cert, &args.token_file) else {
        anyhow::bail!("a certificate from the CA {address} needs --ca-root-cert and --token-file");
    };
    tls::ca::start(
        tls::ca::CaOptions {
            address,
            server_name: args.control_name.clone(),
            root_cert: root.clone(),
            token_file: token.clone(),
            spiffe: format!(
                "spiffe://{}/ns/{}/sa/{}",
                args.trust_domain, args.namespace, args.service_account
            ),
            ttl: args.cert_ttl,
        },
        store.clone(),
    );
    Ok(())
}

/// Starts a proxy fed by the watched config path. Returns once the admin
/// listener is up; the config loop runs in the background.
pub async fn start_proxy(args: &ProxyArgs) -> anyhow::Result<Arc<Proxy>> {
    let params = params(args)?;
    let identity = ProxyIdentity {
        workload: args.workload.clone(),
        namespace: args.namespace.clone(),
        app: params.labels.get("app").cloned().unwrap_or_default(),
        version: params.labels.get("version").cloned().unwrap_or_default(),
        locality: args.locality.clone(),
        labels: params.labels.clone(),
    };
    let store = bosun_proxy::tls::Store::new();
    start_identity(args, &store)?;
    let proxy = Proxy::new(ProxyOptions {
        identity,
        access_log: args.access_log,
        limits: args.limits(),
        tls: store.clone(),
        workers: args.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
    })
    .map_err(|e| anyhow::anyhow!("starting the workers: {e}"))?;
    let admin = bosun_proxy::admin::bind(args.admin_address)
        .await
        .map_err(|e| anyhow::anyhow!("admin listener {}: {e}", args.admin_address))?;
    tokio::spawn(bosun_proxy::admin::serve(proxy.shared().clone(), admin));
    if !args.status_address.is_empty() {
        let probers = match std::env::var("ISTIO_KUBE_APP_PROBERS") {
            Ok(j) if !j.trim().is_empty() => {
                bosun_proxy::probe::parse(&j).map_err(anyhow::Error::msg)?
            }
            _ => Default::default(),
        };
        let probers = Arc::new(probers);
        for addr in &args.status_address {
            let l = bosun_proxy::admin::bind(*addr)
                .await
                .map_err(|e| anyhow::anyhow!("status listener {addr}: {e}"))?;
            tokio::spawn(bosun_proxy::admin::serve_status(
                proxy.shared().clone(),
                l,
                probers.clone(),
            ));
        }
    }
    if let Some(xds) = &args.xds {
        let opts = bosun_proxy::xds::XdsOptions {
            addresses: xds
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(|a| {
                    if a.contains("://") {
                        a.to_string()
                    } else {
                        format!("http://{a}")
                    }
                })
                .collect(),
            node: node(args, &params),
            delta: !args.xds_sotw,
            tls: args
                .ca_root_cert
                .as_ref()
                .map(|root| bosun_proxy::xds::XdsTls {
                    server_name: args.control_name.clone(),
                    root_cert: root.clone(),
                    store: store.clone(),
                }),
        };
        let p = proxy.clone();
        let wait_for_cert = xds.trim_start().starts_with("https://") && args.cert_dir.is_none();
        tokio::spawn(async move {
            // Over TLS the control service wants the workload certificate
            // (it authenticates xDS by it): ask for config once it is here.
            while wait_for_cert && store.get().is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            bosun_proxy::xds::run(p, opts).await
        });
        return Ok(proxy);
    }
    let Some(config) = args.config.clone() else {
        anyhow::bail!("give --config PATH (files) or --xds ADDR (a control service)");
    };
    let mut readings = bosun_control::source::watch(config);
    let p = proxy.clone();
    tokio::spawn(async move {
        while let Some(reading) = readings.recv().await {
            let translated = reading.and_then(|cfg| bosun_control::translate(&cfg, &params));
            match translated {
                Ok(cfg) => {
                    if cfg.version == p.version() {
                        continue;
                    }
                    // Errors are logged and counted by apply.
                    let _ = p.apply(cfg);
                }
                Err(errors) => {
                    for e in &errors.0 {
                        tracing::error!("config refused, keeping the last good config: {e}");
                    }
                    p.note_rejected();
                }
            }
        }
    });
    Ok(proxy)
}

fn string(v: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(v.to_string())),
    }
}

/// The Node this proxy announces: what the control service translates for.
fn node(args: &ProxyArgs, params: &ProxyParams) -> bosun_xds_proto::core::Node {
    use bosun_control::xds::meta;
    let mut fields = std::collections::BTreeMap::new();
    let mode = match params.mode {
        ProxyMode::Sidecar => "sidecar",
        ProxyMode::Gateway => "gateway",
        ProxyMode::Node => "node",
    };
    fields.insert(meta::MODE.to_string(), string(mode));
    fields.insert(meta::NAMESPACE.to_string(), string(&params.namespace));
    let labels = params
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), string(v)))
        .collect();
    fields.insert(
        meta::LABELS.to_string(),
        Value {
            kind: Some(Kind::StructValue(Struct { fields: labels })),
        },
    );
    fields.insert(
        meta::OUTBOUND_ADDRESS.to_string(),
        string(&args.outbound_address.to_string()),
    );
    fields.insert(
        meta::INBOUND_ADDRESS.to_string(),
        string(&args.inbound_address.to_string()),
    );
    if args.capture {
        fields.insert(meta::INTERCEPTION_MODE.to_string(), string("REDIRECT"));
    } else if let Some(app) = args.app_port {
        fields.insert(meta::APP_PORT.to_string(), string(&app.to_string()));
    }
    fields.insert(
        meta::GATEWAY_ADDRESS.to_string(),
        string(&args.gateway_address),
    );
    bosun_xds_proto::core::Node {
        id: args
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{mode}~{}~{}", args.workload, params.namespace)),
        cluster: args.workload.clone(),
        metadata: Some(Struct { fields }),
        locality: (!args.locality.is_empty()).then(|| {
            let mut p = args.locality.splitn(3, '/');
            bosun_xds_proto::core::Locality {
                region: p.next().unwrap_or("").into(),
                zone: p.next().unwrap_or("").into(),
                sub_zone: p.next().unwrap_or("").into(),
            }
        }),
        user_agent_name: "bosun".into(),
        user_agent_version_type: Some(
            bosun_xds_proto::core::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            ),
        ),
        client_features: vec![],
    }
}

/// `bosun proxy --mode node`: kube-proxy's job, until Ctrl-C or SIGTERM;
/// the rules are removed on the way out.
pub async fn run_node(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let backend = match args.backend {
        crate::NodeBackend::Nftables => bosun_node::Backend::Nftables,
        crate::NodeBackend::Iptables => bosun_node::Backend::Iptables,
        crate::NodeBackend::Userspace => bosun_node::Backend::Userspace,
    };
    if args.cleanup {
        bosun_node::Syncer::cleanup(backend)
            .await
            .map_err(anyhow::Error::msg)?;
        println!("node rules removed ({backend:?})");
        return Ok(ExitCode::SUCCESS);
    }
    let node_name = match &args.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
    };
    let source = match (&args.config, &args.xds) {
        (Some(path), _) => bosun_node::Source::Config(path.clone()),
        (None, Some(xds)) => bosun_node::Source::Xds(bosun_node::xds::XdsOptions {
            addresses: xds.split(',').map(|a| a.trim().to_string()).collect(),
            node_id: args
                .node_id
                .clone()
                .unwrap_or_else(|| format!("node~{node_name}")),
            node_name: node_name.clone(),
        }),
        (None, None) => anyhow::bail!("node mode needs --config PATH or --xds ADDR"),
    };
    let opts = bosun_node::NodeOptions {
        source,
        node_name,
        backend,
        cluster_cidr: args.cluster_cidr.clone(),
        healthz_address: args.healthz_address,
        metrics_address: args.metrics_address,
        drain: args.drain_duration,
    };
    let mut signals = crate::Signals::new()?;
    let stop = async move { signals.recv().await };
    bosun_node::run(opts, stop)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(ExitCode::SUCCESS)
}

/// Runs the proxy until SIGTERM, SIGINT or `POST /quitquitquit`, then drains:
/// listeners close, `/ready` turns 503, in-flight work gets
/// `--drain-duration` to finish, and the process exits 0. A second signal
/// exits at once (1).
pub async fn run_proxy(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let mut signals = crate::Signals::new()?;
    let proxy = start_proxy(&args).await?;
    // Start-up code (flags, config loading, TLS set-up, the first xDS
    // exchange) is not run again: its pages go, and the rest of the
    // binary is mapped only as the proxy runs it (proxy/src/sys.rs).
    // Start-up goes on for a moment after this point (the first xDS
    // answer comes within a second or two), hence 1 s and 4 s in; not
    // later, so no page is faulted back in under steady load.
    tokio::spawn(async {
        for wait in [1, 3] {
            tokio::time::sleep(Duration::from_secs(wait)).await;
            bosun_proxy::sys::release_cold_code();
        }
    });
    let drain = proxy.shared().drain.clone();
    let signalled = tokio::select! {
        _ = signals.recv() => {
            tracing::info!("signal received");
            true
        }
        _ = drain.started() => false,
    };
    if signalled && args.exit_on_zero_active_connections {
        // The app is being stopped too and may still send: keep every
        // listener until nothing is connected (a first look after a
        // second, then each second) or the grace is over.
        let deadline = tokio::time::Instant::now() + args.termination_grace;
        tracing::info!(grace = ?args.termination_grace, "waiting for zero active connections");
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = signals.recv() => {
                    tracing::warn!("second signal: exiting without waiting");
                    return Ok(ExitCode::from(1));
                }
                _ = drain.started() => break,
            }
            if drain.active() == 0 || tokio::time::Instant::now() >= deadline {
                break;
            }
        }
    }
    tokio::select! {
        _ = proxy.drain(args.drain_duration) => Ok(ExitCode::SUCCESS),
        _ = signals.recv() => {
            tracing::warn!("second signal: exiting without waiting");
            Ok(ExitCode::from(1))
        }
    }
}

/// `bosun validate PATH`: parse, then check as every proxy will see it.
pub fn validate(path: &Path) -> anyhow::Result<ExitCode> {
    // Every error in one pass: what could not be read, and the checks
    // across resources on everything that could.
    let (cfg, mut errors) = bosun_control::load::load_path_partial(path);
    let readable = !errors.iter().any(|e| e.resource.is_empty() && e.line == 0);
    if readable && let Err(more) = bosun_control::translate::check(&cfg) {
        errors.extend(more.0);
    }
    if errors.is_empty() {
        println!("{}: ok", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    bosun_control::locate::refine_lines(&mut errors);
    for e in &errors {
        println!("{e}");
    }
    Ok(ExitCode::FAILURE)
}
