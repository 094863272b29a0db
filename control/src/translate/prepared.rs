//! A config prepared once for every translation of it, and incremental
//! endpoint updates (Istio's incremental EDS push).

use std::collections::HashSet;
use std::sync::Arc;

use bosun_xds_proto::config as pb;

use super::check::check_with;
use super::registry::{
    Index, Registry, Svc, SvcPort, build_registry, labels_match, resolve_host, service_entry_svcs,
    service_svc,
};
use super::sidecar::exported;
use super::{ProxyParams, translate_with};
use crate::error::{ConfigError, ConfigErrors};
use crate::model::{self, Config, Labels, Sourced};

pub(super) fn prepare(cfg: &Config) -> (Registry, Vec<ConfigError>) {
    let mut errors = crate::validate::validate(cfg);
    let reg = build_registry(cfg, &mut errors);
    (reg, errors)
}

/// A config with what every translation of it shares, computed once: its
/// validation and its service registry (services, endpoints, labels). The
/// control service prepares each accepted config once and translates it
/// for every kind of proxy from here.
pub struct Prepared {
    pub config: Config,
    reg: Registry,
    errors: Vec<ConfigError>,
    id: u64,
    endpoint_update: Option<EndpointUpdate>,
}

/// How a config differs from the one it was prepared from, when all that
/// changed is endpoints: which config, and whose endpoints. Only the
/// `ClusterLoadAssignment`s of those hosts' clusters differ between the
/// two configs' translations, for every proxy (Istio's incremental EDS push).
#[derive(Clone, Debug)]
pub struct EndpointUpdate {
    /// [`Prepared::id`] of the config this one was prepared from.
    pub base: u64,
    /// The hosts whose endpoints changed.
    pub hosts: HashSet<String>,
}

/// A resource whose endpoints changed: a ServiceEntry (its index) or the
/// Service an EndpointSlice belongs to (namespace, name).
enum EndpointsOf {
    Entry(usize),
    Service(String, String),
}

/// The endpoint changes from `old` to `new`, or None when anything else
/// changed too (then the whole config is prepared and checked again).
/// Resources are compared by value: one that only moved in its file (its
/// origin, which errors cite) is the same resource, and since an endpoint
/// update of a valid config cannot make errors outside the services it
/// rebuilds, no error can cite the old place.
fn endpoint_changes(old: &Config, new: &Config) -> Option<Vec<EndpointsOf>> {
    fn unchanged<T: PartialEq>(x: &Sourced<T>, y: &Sourced<T>) -> bool {
        Arc::ptr_eq(&x.value, &y.value) || x.value == y.value
    }
    fn same<T: PartialEq>(a: &[Sourced<T>], b: &[Sourced<T>]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| unchanged(x, y))
    }
    if !(same(&old.virtual_services, &new.virtual_services)
        && same(&old.destination_rules, &new.destination_rules)
        && same(&old.gateways, &new.gateways)
        && same(&old.workload_entries, &new.workload_entries)
        && same(&old.services, &new.services)
        && same(&old.sidecars, &new.sidecars)
        && same(&old.peer_authentications, &new.peer_authentications)
        && same(&old.secrets, &new.secrets)
        && same(&old.pods, &new.pods)
        && old.service_entries.len() == new.service_entries.len()
        && old.endpoint_slices.len() == new.endpoint_slices.len())
    {
        return None;
    }
    let mut out = Vec::new();
    for (i, (a, b)) in old
        .service_entries
        .iter()
        .zip(&new.service_entries)
        .enumerate()
    {
        if unchanged(a, b) {
            continue;
        }
        let without_endpoints = |s: &model::ServiceEntrySpec| model::ServiceEntrySpec {
            endpoints: Vec::new(),
            ..s.clone()
        };
        if a.value.metadata != b.value.metadata
            || without_endpoints(&a.value.spec) != without_endpoints(&b.value.spec)
        {
            return None;
        }
        out.push(EndpointsOf::Entry(i));
    }
    for (a, b) in old.endpoint_slices.iter().zip(&new.endpoint_slices) {
        if unchanged(a, b) {
            continue;
        }
        // A slice renamed or relabelled (moved to another service) may
        // clash with another one: the whole check decides.
        if a.value.metadata != b.value.metadata {
            return None;
        }
        for sl in [&a.value, &b.value] {
            if let Some(svc) = sl.metadata.labels.get("kubernetes.io/service-name") {
                out.push(EndpointsOf::Service(
                    sl.namespace().to_string(),
                    svc.clone(),
                ));
            }
        }
    }
    Some(out)
}

static PREPARED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Prepared {
    pub fn new(config: Config) -> Prepared {
        let (reg, errors) = prepare(&config);
        Prepared {
            config,
            reg,
            errors,
            id: PREPARED.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            endpoint_update: None,
        }
    }

    /// `config` prepared after `prev`: when the two differ only in some
    /// services' endpoints, only those services are built again and the
    /// result carries an [`EndpointUpdate`]; otherwise as [`Prepared::new`].
    pub fn update(prev: &Prepared, config: Config) -> Prepared {
        if prev.errors.is_empty()
            && let Some(changed) = endpoint_changes(&prev.config, &config)
        {
            let ix = Index::new(&config);
            let mut reg = prev.reg.clone();
            let mut errors = Vec::new();
            let mut hosts = HashSet::new();
            let mut complete = true;
            for c in &changed {
                let svcs = match c {
                    EndpointsOf::Entry(i) => {
                        service_entry_svcs(&config.service_entries[*i], &ix, &mut errors)
                    }
                    EndpointsOf::Service(ns, name) => config
                        .services
                        .iter()
                        .filter(|s| s.value.namespace() == ns && &s.value.metadata.name == name)
                        .map(|s| service_svc(s, &ix, &mut errors))
                        .collect(),
                };
                for svc in svcs {
                    match reg.by_host.get(&svc.host) {
                        Some(&i) => {
                            hosts.insert(svc.host.clone());
                            reg.services[i] = Arc::new(svc);
                        }
                        None => complete = false,
                    }
                }
            }
            drop(ix);
            if complete {
                return Prepared {
                    config,
                    reg,
                    errors,
                    id: PREPARED.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    endpoint_update: Some(EndpointUpdate {
                        base: prev.id,
                        hosts,
                    }),
                };
            }
        }
        Prepared::new(config)
    }

    /// Unique among the configs this process prepared.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Set when this config was prepared from another one that differs
    /// from it only in endpoints.
    pub fn endpoint_update(&self) -> Option<&EndpointUpdate> {
        self.endpoint_update.as_ref()
    }

    /// [`translate_unversioned`](super::translate_unversioned) of this config.
    pub fn translate(&self, params: &ProxyParams) -> Result<pb::ProxyConfig, ConfigErrors> {
        translate_with(&self.config, &self.reg, self.errors.clone(), params)
    }

    /// [`check`](super::check) of this config. An endpoint update of a checked config
    /// needs only its rebuilt services checked: endpoints reach nothing
    /// but `ClusterLoadAssignment`s, whose translation cannot fail.
    pub fn check(&self) -> Result<(), ConfigErrors> {
        if self.endpoint_update.is_some() {
            return if self.errors.is_empty() {
                Ok(())
            } else {
                Err(ConfigErrors(self.errors.clone()))
            };
        }
        check_with(&self.config, |params| self.translate(params))
    }

    /// The `ClusterLoadAssignment` of outbound cluster `name` for a proxy of
    /// `params`, as [`Prepared::translate`] makes it; None when `name` is not
    /// an outbound cluster of a known host and port.
    pub fn assignment(
        &self,
        params: &ProxyParams,
        name: &str,
    ) -> Option<pb::ClusterLoadAssignment> {
        let mut parts = name.splitn(4, '|');
        if parts.next()? != "outbound" {
            return None;
        }
        let port: u32 = parts.next()?.parse().ok()?;
        let subset = parts.next()?;
        let host = parts.next()?;
        let svc = &self.reg.services[*self.reg.by_host.get(host)?];
        let sp = svc.port(port)?;
        let selector = if subset.is_empty() {
            Labels::new()
        } else {
            // The DestinationRule the proxy sees for this host (the last
            // one, as translation keeps it; several is an error there).
            let dr = self.config.destination_rules.iter().rev().find(|d| {
                exported(
                    &d.value.spec.export_to,
                    d.value.namespace(),
                    &params.namespace,
                ) && resolve_host(&d.value.spec.host, d.value.namespace(), &self.reg.by_host)
                    == host
            })?;
            dr.value
                .spec
                .subsets
                .iter()
                .find(|s| s.name == subset)?
                .labels
                .clone()
        };
        Some(load_assignment(name, svc, sp, &selector))
    }
}

/// The label that marks a workload with an Istio (or Bosun) sidecar: auto
/// mTLS speaks Istio mutual TLS to it.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// The endpoints of one cluster: the service's endpoints that the subset's
/// labels select, on the service port's target.
pub(super) fn load_assignment(
    name: &str,
    svc: &Svc,
    sp: &SvcPort,
    selector: &Labels,
) -> pb::ClusterLoadAssignment {
    let endpoints = svc
        .endpoints
        .iter()
        .filter(|e| labels_match(selector, &e.labels))
        .map(|e| pb::Endpoint {
            address: e.address.clone(),
            port: svc.endpoint_port(e, sp),
            labels: e
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            workload: e.workload.clone(),
            namespace: e.namespace.clone(),
            locality: e.locality.clone(),
            istio_mtls: e.labels.get(TLS_MODE_LABEL).is_some_and(|v| v == "istio"),
        })
        .collect();
    pb::ClusterLoadAssignment {
        cluster: name.to_string(),
        endpoints,
    }
}
