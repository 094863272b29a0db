//! Kubernetes Services as every consumer reads them: sidecars and gateways
//! (the translation's registry) and node mode (its service map) index Pods
//! and EndpointSlices here, decide here which endpoints are live, and parse
//! `sessionAffinity` here, so the two can never disagree.
//!
//! **Liveness**, decided once, as kube-proxy does (KEP-1669): an endpoint
//! gets new traffic when it is `ready` (absent means ready); when a Service
//! port has no ready endpoint at all, its endpoints that are `serving` and
//! `terminating` get it instead, so a Deployment rolling its last pods does
//! not drop connections. Istio's sidecars route to ready endpoints only and
//! then answer 503; Bosun's proxies follow the same fallback as its node
//! mode, which only ever adds endpoints that still serve.

use std::collections::HashMap;

use crate::model::{self, Config, Labels, Sourced};

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Pods and EndpointSlices of one config, indexed once.
pub struct KubeIndex<'a> {
    /// By namespace, then name.
    pods: HashMap<&'a str, HashMap<&'a str, &'a model::Pod>>,
    /// By namespace, then Service name.
    slices: HashMap<&'a str, HashMap<&'a str, Vec<&'a Sourced<model::EndpointSlice>>>>,
}

impl<'a> KubeIndex<'a> {
    pub fn new(cfg: &'a Config) -> Self {
        let mut pods: HashMap<&str, HashMap<&str, &model::Pod>> = HashMap::new();
        for p in &cfg.pods {
            let v = &*p.value;
            pods.entry(v.metadata.namespace.as_deref().unwrap_or("default"))
                .or_default()
                .insert(v.metadata.name.as_str(), v);
        }
        let mut slices: HashMap<&str, HashMap<&str, Vec<_>>> = HashMap::new();
        for sl in &cfg.endpoint_slices {
            if let Some(svc) = sl.value.metadata.labels.get("kubernetes.io/service-name") {
                slices
                    .entry(sl.value.namespace())
                    .or_default()
                    .entry(svc.as_str())
                    .or_default()
                    .push(sl);
            }
        }
        KubeIndex { pods, slices }
    }

    /// The EndpointSlices of Service `ns/name`.
    pub fn slices(&self, ns: &str, name: &str) -> &[&'a Sourced<model::EndpointSlice>] {
        self.slices
            .get(ns)
            .and_then(|m| m.get(name))
            .map_or(&[], Vec::as_slice)
    }

    /// The Pod an endpoint's `targetRef` names (its labels select subsets).
    pub fn pod(&self, svc_ns: &str, e: &model::SliceEndpoint) -> Option<&'a model::Pod> {
        let r = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))?;
        let ns = r.namespace.as_deref().unwrap_or(svc_ns);
        self.pods.get(ns)?.get(r.name.as_deref()?).copied()
    }

    pub fn pod_labels(&self, svc_ns: &str, e: &model::SliceEndpoint) -> Option<&'a Labels> {
        self.pod(svc_ns, e).map(|p| &p.metadata.labels)
    }
}

/// Where an endpoint stands for new traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Ready,
    /// Serving while terminating: used only when nothing is ready.
    Fallback,
    Out,
}

pub fn liveness(e: &model::SliceEndpoint) -> Liveness {
    let c = e.conditions.clone().unwrap_or_default();
    let ready = c.ready.unwrap_or(true);
    if ready {
        return Liveness::Ready;
    }
    let serving = c.serving.unwrap_or(ready);
    if serving && c.terminating.unwrap_or(false) {
        Liveness::Fallback
    } else {
        Liveness::Out
    }
}

/// Collects endpoints by the liveness rule: the ready ones, or when there
/// are none, the serving-terminating ones.
#[derive(Debug)]
pub struct Live<T> {
    ready: Vec<T>,
    fallback: Vec<T>,
}

impl<T> Default for Live<T> {
    fn default() -> Self {
        Live {
            ready: Vec::new(),
            fallback: Vec::new(),
        }
    }
}

impl<T> Live<T> {
    pub fn push(&mut self, l: Liveness, t: T) {
        match l {
            Liveness::Ready => self.ready.push(t),
            Liveness::Fallback => self.fallback.push(t),
            Liveness::Out => {}
        }
    }

    pub fn into_vec(self) -> Vec<T> {
        if self.ready.is_empty() {
            self.fallback
        } else {
            self.ready
        }
    }
}

/// `sessionAffinity`: `None` → no affinity, `ClientIP` → its timeout
/// (seconds, 1..=86400, default 10800). Errors name the field.
pub fn session_affinity(spec: &model::ServiceSpec) -> Result<Option<u32>, (&'static str, String)> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
            if !(1..=86_400).contains(&t) {
                return Err((
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t}: want 1 to 86400"),
                ));
            }
            Ok(Some(t))
        }
        Some(other) => Err((
            "spec.sessionAffinity",
            format!("{other:?}: want None or ClientIP"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> model::SliceEndpoint {
        model::SliceEndpoint {
            addresses: vec!["10.0.0.1".into()],
            conditions: Some(model::Conditions {
                ready,
                serving,
                terminating,
            }),
            hostname: None,
            node_name: None,
            zone: None,
            target_ref: None,
        }
    }

    #[test]
    fn ready_first_then_serving_terminating() {
        assert_eq!(liveness(&ep(None, None, None)), Liveness::Ready);
        assert_eq!(
            liveness(&ep(Some(false), Some(true), Some(true))),
            Liveness::Fallback
        );
        assert_eq!(
            liveness(&ep(Some(false), Some(false), Some(true))),
            Liveness::Out
        );
        assert_eq!(liveness(&ep(Some(false), None, None)), Liveness::Out);
        let mut l = Live::default();
        l.push(Liveness::Fallback, 1);
        l.push(Liveness::Out, 2);
        assert_eq!(l.into_vec(), vec![1]);
        let mut l = Live::default();
        l.push(Liveness::Fallback, 1);
        l.push(Liveness::Ready, 3);
        assert_eq!(l.into_vec(), vec![3]);
    }
}
