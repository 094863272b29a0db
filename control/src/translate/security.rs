//! Security settings of a proxy's config: PeerAuthentication (the inbound
//! mutual TLS mode) and the identities auto mTLS expects of a service.

use bosun_xds_proto::config as pb;

use super::ProxyParams;
use crate::model::{Config, PeerAuthentication};

/// Istio's root namespace: a PeerAuthentication there without a selector
/// is mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

fn mode(m: Option<&str>) -> Option<pb::PeerMtls> {
    match m {
        Some("STRICT") => Some(pb::PeerMtls::Strict),
        Some("PERMISSIVE") => Some(pb::PeerMtls::Permissive),
        Some("DISABLE") => Some(pb::PeerMtls::Disable),
        // UNSET or absent: inherit.
        _ => None,
    }
}

fn selects(pa: &PeerAuthentication, params: &ProxyParams) -> bool {
    pa.spec.selector.as_ref().is_some_and(|s| {
        s.match_labels
            .iter()
            .all(|(k, v)| params.labels.get(k) == Some(v))
    })
}

/// The inbound mode for the workload's `port`, as Istio resolves it: the
/// workload's own policy (its `portLevelMtls` for the port first), else
/// its namespace's, else the mesh-wide one, else PERMISSIVE. A level whose
/// mode is UNSET defers to the next. Several policies at one level: the
/// first in the config wins (Istio takes the oldest).
pub fn peer_mtls(cfg: &Config, params: &ProxyParams, port: u32) -> pb::PeerMtls {
    let pas = || cfg.peer_authentications.iter().map(|p| &*p.value);
    let workload = pas().find(|p| p.namespace() == params.namespace && selects(p, params));
    let namespace = pas().find(|p| p.namespace() == params.namespace && p.spec.selector.is_none());
    let mesh = pas().find(|p| p.namespace() == ROOT_NAMESPACE && p.spec.selector.is_none());
    let port_key = port.to_string();
    workload
        .and_then(|p| p.spec.port_level_mtls.get(&port_key))
        .and_then(|m| mode(m.mode.as_deref()))
        .or_else(|| workload.and_then(|p| mode(p.spec.mtls.as_ref()?.mode.as_deref())))
        .or_else(|| namespace.and_then(|p| mode(p.spec.mtls.as_ref()?.mode.as_deref())))
        .or_else(|| mesh.and_then(|p| mode(p.spec.mtls.as_ref()?.mode.as_deref())))
        .unwrap_or(pb::PeerMtls::Permissive)
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
pub fn spiffe(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}
