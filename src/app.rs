//! Composition root: config source → validation/translation → proxy.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use bosun_control::translate::{ProxyMode, ProxyParams};
use bosun_proxy::config::ProxyIdentity;
use bosun_proxy::{Proxy, ProxyOptions};

use crate::{Mode, ProxyArgs, parse_labels};

pub fn params(args: &ProxyArgs) -> anyhow::Result<ProxyParams> {
    let labels = match (&args.labels, args.mode) {
        (Some(l), _) => parse_labels(l)?,
        (None, Mode::Gateway) => parse_labels("istio=ingressgateway")?,
        (None, Mode::Sidecar) => Default::default(),
    };
    Ok(ProxyParams {
        mode: match args.mode {
            Mode::Sidecar => ProxyMode::Sidecar,
            Mode::Gateway => ProxyMode::Gateway,
        },
        namespace: args.namespace.clone(),
        labels,
        outbound_address: args.outbound_address.ip().to_string(),
        outbound_port: u32::from(args.outbound_address.port()),
        inbound: args.app_port.map(|app| {
            (
                args.inbound_address.ip().to_string(),
                u32::from(args.inbound_address.port()),
                u32::from(app),
            )
        }),
        gateway_address: args.gateway_address.clone(),
    })
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
    };
    let proxy = Proxy::new(ProxyOptions {
        identity,
        access_log: args.access_log,
    });
    let admin = bosun_proxy::admin::bind(args.admin_address)
        .await
        .map_err(|e| anyhow::anyhow!("admin listener {}: {e}", args.admin_address))?;
    tokio::spawn(bosun_proxy::admin::serve(proxy.shared().clone(), admin));
    let mut readings = bosun_control::source::watch(args.config.clone());
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

pub async fn run_proxy(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let _proxy = start_proxy(&args).await?;
    tokio::signal::ctrl_c().await?;
    tracing::info!("shutting down");
    Ok(ExitCode::SUCCESS)
}

/// `bosun validate PATH`: parse and translate for a sidecar and a gateway.
pub fn validate(path: &Path) -> anyhow::Result<ExitCode> {
    let cfg = match bosun_control::load::load_path(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                println!("{e}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    for mode in [ProxyMode::Sidecar, ProxyMode::Gateway] {
        let mut params = ProxyParams {
            mode,
            ..Default::default()
        };
        // Every Gateway's selector, so every server is checked.
        for g in &cfg.gateways {
            params.labels.extend(g.value.spec.selector.clone());
        }
        if let Err(errors) = bosun_control::translate(&cfg, &params) {
            for e in errors.0 {
                let s = e.to_string();
                if seen.insert(s.clone()) {
                    println!("{s}");
                }
            }
        }
    }
    if seen.is_empty() {
        println!("{}: ok", path.display());
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}
