//! Model → `bosun.config.v1`, per proxy.
//!
//! Istio semantics are resolved here, once, off the data path: short host
//! names become FQDNs, `sourceLabels` and `gateways` are matched against the
//! proxy, subsets become clusters of the endpoints whose labels match, and
//! traffic policies are merged (subset > port level > top level). The proxy
//! receives only what it must evaluate per request.

mod check;
mod cluster;
pub mod credentials;
mod duration;
mod gateway;
mod prepared;
mod registry;
pub(crate) mod resilience;
mod route;
pub mod security;
mod sidecar;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, HashMap};

use bosun_xds_proto::config as pb;

pub use check::check;
pub use cluster::cluster_host;
pub use duration::parse_duration_secs;
pub use prepared::{EndpointUpdate, Prepared};

use cluster::fnv64;
use gateway::gateway;
use prepared::prepare;
use registry::{Registry, resolve_host};
use sidecar::{exported, sidecar};

use crate::error::{ConfigError, ConfigErrors};
use crate::model::{Config, DestinationRule, Labels, Sourced};

/// Which proxy the config is for.
#[derive(Debug, Clone)]
pub struct ProxyParams {
    pub mode: ProxyMode,
    pub namespace: String,
    pub labels: Labels,
    /// Sidecar: where the outbound HTTP listener binds (and the IP TCP listeners use).
    pub outbound_address: String,
    pub outbound_port: u32,
    /// Sidecar: inbound listener (address, port) and the local app port it forwards to.
    pub inbound: Option<(String, u32, u32)>,
    /// Gateway: address the Gateway server ports bind on.
    pub gateway_address: String,
    /// Translating only to find errors (the config check): Sidecar egress
    /// scoping is ignored, so every route is checked, and no endpoints are
    /// listed (they cannot be wrong, and at 10k services they are most of
    /// the work and memory of a translation).
    pub check_only: bool,
    /// The mesh's SPIFFE trust domain (Istio's default `cluster.local`).
    pub trust_domain: String,
    /// Sidecar with transparent capture (Istio's node metadata
    /// `INTERCEPTION_MODE: REDIRECT`): one outbound and one inbound
    /// listener, routing by original destination.
    pub capture: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Sidecar,
    Gateway,
    /// Node mode: receives `NodeService` resources, not a proxy config.
    Node,
}

impl Default for ProxyParams {
    fn default() -> Self {
        ProxyParams {
            mode: ProxyMode::Sidecar,
            namespace: "default".into(),
            labels: Labels::new(),
            outbound_address: "127.0.0.1".into(),
            outbound_port: 15001,
            inbound: None,
            gateway_address: "0.0.0.0".into(),
            check_only: false,
            trust_domain: "cluster.local".into(),
            capture: false,
        }
    }
}

struct Ctx<'a> {
    cfg: &'a Config,
    params: &'a ProxyParams,
    reg: &'a Registry,
    drs: HashMap<String, &'a Sourced<DestinationRule>>,
    errors: Vec<ConfigError>,
    clusters: BTreeMap<String, pb::Cluster>,
    assignments: BTreeMap<String, pb::ClusterLoadAssignment>,
}

/// Translates a whole config for one proxy. All errors are returned together.
pub fn translate(cfg: &Config, params: &ProxyParams) -> Result<pb::ProxyConfig, ConfigErrors> {
    let mut out = translate_unversioned(cfg, params)?;
    let version = fnv64(&bosun_xds_proto::prost::Message::encode_to_vec(&out));
    out.version = format!("{version:016x}");
    Ok(out)
}

/// [`translate`] without the version: for callers that version the
/// resources themselves (the ADS server hashes each one) or only check.
pub fn translate_unversioned(
    cfg: &Config,
    params: &ProxyParams,
) -> Result<pb::ProxyConfig, ConfigErrors> {
    let (reg, errors) = prepare(cfg);
    translate_with(cfg, &reg, errors, params)
}

fn translate_with(
    cfg: &Config,
    reg: &Registry,
    mut errors: Vec<ConfigError>,
    params: &ProxyParams,
) -> Result<pb::ProxyConfig, ConfigErrors> {
    let mut drs = HashMap::new();
    for d in &cfg.destination_rules {
        if !exported(
            &d.value.spec.export_to,
            d.value.namespace(),
            &params.namespace,
        ) {
            continue;
        }
        let host = resolve_host(&d.value.spec.host, d.value.namespace(), &reg.by_host);
        if let Some(prev) = drs.insert(host.clone(), d) {
            errors.push(ConfigError::at(
                &d.origin,
                d.value.id(),
                "spec.host",
                format!(
                    "host {host} already has DestinationRule {}",
                    prev.value.id()
                ),
            ));
        }
    }
    let mut ctx = Ctx {
        cfg,
        params,
        reg,
        drs,
        errors,
        clusters: BTreeMap::new(),
        assignments: BTreeMap::new(),
    };
    let mut out = pb::ProxyConfig::default();
    match params.mode {
        ProxyMode::Sidecar => sidecar(&mut ctx, &mut out),
        ProxyMode::Gateway => gateway(&mut ctx, &mut out),
        ProxyMode::Node => {} // see node_services
    }
    if !ctx.errors.is_empty() {
        return Err(ConfigErrors(ctx.errors));
    }
    out.clusters = ctx.clusters.into_values().collect();
    out.load_assignments = ctx.assignments.into_values().collect();
    Ok(out)
}
