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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::load_sources;

    fn cfg(yaml: &str) -> Config {
        load_sources(&[("pa.yaml".into(), yaml.into())]).expect("parses")
    }

    fn pa(ns: &str, name: &str, body: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}---\n"
        )
    }

    fn proxy(ns: &str, app: &str) -> ProxyParams {
        ProxyParams {
            namespace: ns.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn peer_authentication_resolves_workload_then_namespace_then_mesh() {
        let c = cfg(&[
            pa("istio-system", "mesh", "  mtls: {mode: STRICT}\n"),
            pa("shop", "ns", "  mtls: {mode: PERMISSIVE}\n"),
            pa(
                "shop",
                "cart",
                "  selector: {matchLabels: {app: cart}}\n  mtls: {mode: UNSET}\n  portLevelMtls:\n    \"8080\": {mode: DISABLE}\n",
            ),
        ]
        .concat());
        // No policy of its own, none in its namespace: the mesh-wide one.
        assert_eq!(peer_mtls(&c, &proxy("web", "x"), 80), pb::PeerMtls::Strict);
        // The namespace's beats the mesh's.
        assert_eq!(
            peer_mtls(&c, &proxy("shop", "x"), 80),
            pb::PeerMtls::Permissive
        );
        // The workload's port-level setting for its port; UNSET defers to the namespace.
        assert_eq!(
            peer_mtls(&c, &proxy("shop", "cart"), 8080),
            pb::PeerMtls::Disable
        );
        assert_eq!(
            peer_mtls(&c, &proxy("shop", "cart"), 9090),
            pb::PeerMtls::Permissive
        );
        // Nothing at all: Istio's default.
        assert_eq!(
            peer_mtls(&Config::default(), &proxy("web", "x"), 80),
            pb::PeerMtls::Permissive
        );
    }
}
