//! Model → `bosun.config.v1`, per proxy.
//!
//! Istio semantics are resolved here, once, off the data path: short host
//! names become FQDNs, `sourceLabels` and `gateways` are matched against the
//! proxy, subsets become clusters of the endpoints whose labels match, and
//! traffic policies are merged (subset > port level > top level). The proxy
//! receives only what it must evaluate per request.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use bosun_xds_proto::config as pb;

use crate::load::{ConfigError, ConfigErrors};
use crate::model::{
    self, Config, DestinationRule, HttpMatchRequest, Labels, LoadBalancerSettings, Origin, Sourced,
    StringMatch,
};

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
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortProtocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl PortProtocol {
    fn is_http(self) -> bool {
        !matches!(self, PortProtocol::Tcp)
    }
    fn upstream(self) -> pb::UpstreamProtocol {
        match self {
            PortProtocol::Http => pb::UpstreamProtocol::Http1,
            PortProtocol::Http2 | PortProtocol::Grpc => pb::UpstreamProtocol::Http2,
            PortProtocol::Tcp => pb::UpstreamProtocol::Tcp,
        }
    }
}

/// Istio's protocol selection: explicit protocol/appProtocol, else the port name prefix.
fn select_protocol(explicit: Option<&str>, name: Option<&str>) -> Result<PortProtocol, String> {
    let from = |p: &str| -> Option<PortProtocol> {
        match p.to_ascii_lowercase().as_str() {
            "http" => Some(PortProtocol::Http),
            "http2" | "kubernetes.io/h2c" | "h2c" => Some(PortProtocol::Http2),
            "grpc" | "grpc-web" => Some(PortProtocol::Grpc),
            "tcp" | "mongo" | "mysql" | "redis" => Some(PortProtocol::Tcp),
            _ => None,
        }
    };
    if let Some(p) = explicit {
        return match from(p) {
            Some(proto) => Ok(proto),
            None if matches!(p.to_ascii_uppercase().as_str(), "HTTPS" | "TLS") => Err(format!(
                "protocol {p} is not supported by Bosun yet (TLS arrives with mTLS and gateway TLS)"
            )),
            None => Err(format!(
                "protocol {p} is not supported (use HTTP, HTTP2, GRPC or TCP)"
            )),
        };
    }
    if let Some(n) = name {
        let prefix = n.split('-').next().unwrap_or("");
        if let Some(p) = from(prefix) {
            return Ok(p);
        }
    }
    // Istio would sniff; Bosun does not, so an unnamed port is opaque TCP.
    Ok(PortProtocol::Tcp)
}

#[derive(Debug, Clone)]
struct SvcPort {
    number: u32,
    name: String,
    protocol: PortProtocol,
    target: Option<model::IntOrString>,
}

#[derive(Debug, Clone)]
struct Ep {
    address: String,
    /// Port by service port name (EndpointSlice ports, WorkloadEntry ports).
    named_ports: Arc<BTreeMap<String, u32>>,
    labels: Arc<Labels>,
    workload: String,
    namespace: String,
}

/// Shares equal label and port maps between endpoints: a service's
/// endpoints mostly carry the same ones, and a small `BTreeMap` costs
/// hundreds of bytes (at 100k endpoints, ~90 MB of copies).
#[derive(Default)]
struct Interner {
    labels: HashMap<Labels, Arc<Labels>>,
    ports: HashMap<BTreeMap<String, u32>, Arc<BTreeMap<String, u32>>>,
}

impl Interner {
    fn labels(&mut self, l: &Labels) -> Arc<Labels> {
        if let Some(a) = self.labels.get(l) {
            return a.clone();
        }
        let a = Arc::new(l.clone());
        self.labels.insert(l.clone(), a.clone());
        a
    }

    fn ports(&mut self, p: &BTreeMap<String, u32>) -> Arc<BTreeMap<String, u32>> {
        if let Some(a) = self.ports.get(p) {
            return a.clone();
        }
        let a = Arc::new(p.clone());
        self.ports.insert(p.clone(), a.clone());
        a
    }
}

#[derive(Debug, Clone)]
struct Svc {
    host: String,
    name: String,
    namespace: String,
    /// ServiceEntry `exportTo`; empty: every namespace.
    export_to: Vec<String>,
    ports: Vec<SvcPort>,
    endpoints: Vec<Ep>,
    origin: Origin,
    id: String,
    /// A Service's `sessionAffinity: ClientIP`.
    client_ip_affinity: bool,
}

impl Svc {
    fn port(&self, number: u32) -> Option<&SvcPort> {
        self.ports.iter().find(|p| p.number == number)
    }
    fn endpoint_port(&self, ep: &Ep, port: &SvcPort) -> u32 {
        if let Some(p) = ep.named_ports.get(&port.name) {
            return *p;
        }
        match &port.target {
            Some(model::IntOrString::Int(n)) => *n,
            Some(model::IntOrString::String(name)) => {
                ep.named_ports.get(name).copied().unwrap_or(port.number)
            }
            None => port.number,
        }
    }
}

fn labels_match(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Istio's short-name expansion: `reviews` in namespace `ns` is
/// `reviews.ns.svc.cluster.local`; `reviews.other` is `reviews.other.svc.cluster.local`.
fn resolve_host(host: &str, namespace: &str, known: &HashMap<String, usize>) -> String {
    if host.contains('*') || known.contains_key(host) {
        return host.to_string();
    }
    let dots = host.matches('.').count();
    let candidate = match dots {
        0 => format!("{host}.{namespace}.svc.cluster.local"),
        1 => format!("{host}.svc.cluster.local"),
        _ if host.ends_with(".svc") => format!("{host}.cluster.local"),
        _ => host.to_string(),
    };
    if known.contains_key(&candidate) || dots == 0 {
        candidate
    } else {
        host.to_string()
    }
}

/// The services of a config by host: Services and ServiceEntries with their
/// endpoints. Shared (`Arc`) so that a config differing only in some
/// endpoints rebuilds those services and shares the rest.
#[derive(Clone)]
struct Registry {
    services: Vec<Arc<Svc>>,
    by_host: Arc<HashMap<String, usize>>,
}

/// What building a service's endpoints looks up, indexed once per config.
struct Index<'a> {
    pods: HashMap<(String, String), &'a model::Pod>,
    slices: HashMap<(&'a str, &'a str), Vec<&'a model::EndpointSlice>>,
    workloads: HashMap<&'a str, Vec<&'a model::WorkloadEntry>>,
    interner: std::cell::RefCell<Interner>,
}

impl<'a> Index<'a> {
    fn new(cfg: &'a Config) -> Index<'a> {
        let pods: HashMap<(String, String), &'a model::Pod> = cfg
            .pods
            .iter()
            .map(|p| {
                let ns = p
                    .value
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                ((ns, p.value.metadata.name.clone()), &*p.value)
            })
            .collect();
        // Slices by (namespace, service name) and workload entries by namespace:
        // one pass over each instead of one per Service.
        let mut slices: HashMap<(&'a str, &'a str), Vec<&'a model::EndpointSlice>> = HashMap::new();
        for sl in &cfg.endpoint_slices {
            if let Some(svc) = sl.value.metadata.labels.get("kubernetes.io/service-name") {
                slices
                    .entry((sl.value.namespace(), svc.as_str()))
                    .or_default()
                    .push(&sl.value);
            }
        }
        let mut workloads: HashMap<&'a str, Vec<&'a model::WorkloadEntry>> = HashMap::new();
        for we in &cfg.workload_entries {
            workloads
                .entry(we.value.namespace())
                .or_default()
                .push(&we.value);
        }
        Index {
            pods,
            slices,
            workloads,
            interner: Default::default(),
        }
    }
}

/// A Kubernetes Service with its endpoints (EndpointSlices, and
/// WorkloadEntries its selector matches).
fn service_svc(s: &Sourced<model::Service>, ix: &Index, errors: &mut Vec<ConfigError>) -> Svc {
    let obj = &s.value;
    let ns = obj.namespace().to_string();
    // ClientIP affinity: consistent hashing on the source address, as
    // Istio does (a DestinationRule's loadBalancer takes precedence).
    let client_ip_affinity = match obj.spec.session_affinity.as_deref() {
        None | Some("None") => false,
        Some("ClientIP") => true,
        Some(other) => {
            errors.push(ConfigError::at(
                &s.origin,
                obj.id(),
                "spec.sessionAffinity",
                format!("{other:?}: want None or ClientIP"),
            ));
            false
        }
    };
    if obj
        .spec
        .internal_traffic_policy
        .as_deref()
        .is_some_and(|a| a != "Cluster")
    {
        errors.push(ConfigError::at(
            &s.origin,
            obj.id(),
            "spec.internalTrafficPolicy",
            "Local is implemented by node mode (`bosun proxy --mode node`), not by sidecars and gateways yet".into(),
        ));
    }
    let mut ports = Vec::new();
    for (i, p) in obj.spec.ports.iter().enumerate() {
        if p.protocol.as_deref().is_some_and(|x| x != "TCP") {
            errors.push(ConfigError::at(
                &s.origin,
                obj.id(),
                &format!("spec.ports[{i}].protocol"),
                "only TCP service ports are supported by Bosun yet".into(),
            ));
            continue;
        }
        match select_protocol(p.app_protocol.as_deref(), p.name.as_deref()) {
            Ok(protocol) => ports.push(SvcPort {
                number: p.port,
                name: p.name.clone().unwrap_or_default(),
                protocol,
                target: p.target_port.clone(),
            }),
            Err(m) => errors.push(ConfigError::at(
                &s.origin,
                obj.id(),
                &format!("spec.ports[{i}].appProtocol"),
                m,
            )),
        }
    }
    let mut endpoints = Vec::new();
    let own = ix
        .slices
        .get(&(ns.as_str(), obj.metadata.name.as_str()))
        .map_or(&[][..], Vec::as_slice);
    for sl in own {
        let named_ports: BTreeMap<String, u32> = sl
            .ports
            .iter()
            .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port?)))
            .collect();
        let named_ports = ix.interner.borrow_mut().ports(&named_ports);
        for e in &sl.endpoints {
            // Ready endpoints only; Bosun has no health checks of its own yet.
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            // Subsets select on the labels of the Pod behind the endpoint.
            let pod = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let pns = r.namespace.as_deref().unwrap_or(&ns);
                    ix.pods
                        .get(&(pns.to_string(), r.name.clone().unwrap_or_default()))
                });
            for a in &e.addresses {
                endpoints.push(Ep {
                    address: a.clone(),
                    named_ports: named_ports.clone(),
                    labels: ix
                        .interner
                        .borrow_mut()
                        .labels(pod.map_or(&Labels::new(), |p| &p.metadata.labels)),
                    workload: pod
                        .map(|p| p.metadata.name.clone())
                        .or_else(|| e.hostname.clone())
                        .unwrap_or_default(),
                    namespace: ns.clone(),
                });
            }
        }
    }
    if !obj.spec.selector.is_empty() {
        for w in ix.workloads.get(ns.as_str()).map_or(&[][..], Vec::as_slice) {
            if labels_match(&obj.spec.selector, &w.spec.labels) {
                endpoints.push(ep_from_workload(
                    ix,
                    &w.spec,
                    &w.metadata.name,
                    w.namespace(),
                ));
            }
        }
    }
    Svc {
        host: format!("{}.{}.svc.cluster.local", obj.metadata.name, ns),
        name: obj.metadata.name.clone(),
        namespace: ns,
        export_to: vec![],
        ports,
        endpoints,
        origin: s.origin.clone(),
        id: obj.id(),
        client_ip_affinity,
    }
}

/// A ServiceEntry: one service per host.
fn service_entry_svcs(
    s: &Sourced<model::ServiceEntry>,
    ix: &Index,
    errors: &mut Vec<ConfigError>,
) -> Vec<Svc> {
    let obj = &s.value;
    let ns = obj.namespace().to_string();
    match obj.spec.resolution.as_deref().unwrap_or("NONE") {
        "STATIC" => {}
        other => {
            errors.push(ConfigError::at(
                &s.origin,
                obj.id(),
                "spec.resolution",
                format!("resolution {other} is not supported by Bosun yet (use STATIC)"),
            ));
            return Vec::new();
        }
    }
    if !obj.spec.addresses.is_empty() {
        errors.push(ConfigError::at(
            &s.origin,
            obj.id(),
            "spec.addresses",
            "not supported by Bosun yet (needs transparent capture)".into(),
        ));
    }
    let mut ports = Vec::new();
    for (i, p) in obj.spec.ports.iter().enumerate() {
        match select_protocol(p.protocol.as_deref(), p.name.as_deref()) {
            Ok(protocol) => ports.push(SvcPort {
                number: p.number,
                name: p.name.clone().unwrap_or_default(),
                protocol,
                target: p.target_port.map(model::IntOrString::Int),
            }),
            Err(m) => errors.push(ConfigError::at(
                &s.origin,
                obj.id(),
                &format!("spec.ports[{i}].protocol"),
                m,
            )),
        }
    }
    let mut endpoints: Vec<Ep> = obj
        .spec
        .endpoints
        .iter()
        .map(|e| ep_from_workload(ix, e, &obj.metadata.name, &ns))
        .collect();
    if let Some(sel) = &obj.spec.workload_selector {
        for w in ix.workloads.get(ns.as_str()).map_or(&[][..], Vec::as_slice) {
            if labels_match(&sel.labels, &w.spec.labels) {
                endpoints.push(ep_from_workload(ix, &w.spec, &w.metadata.name, &ns));
            }
        }
    }
    let mut out = Vec::new();
    for h in &obj.spec.hosts {
        out.push(Svc {
            host: h.clone(),
            name: h.split('.').next().unwrap_or(h).to_string(),
            namespace: ns.clone(),
            export_to: obj.spec.export_to.clone(),
            ports: ports.clone(),
            endpoints: endpoints.clone(),
            origin: s.origin.clone(),
            id: obj.id(),
            client_ip_affinity: false,
        });
    }
    out
}

fn build_registry(cfg: &Config, errors: &mut Vec<ConfigError>) -> Registry {
    let ix = Index::new(cfg);
    let mut services = Vec::new();
    for s in &cfg.services {
        services.push(Arc::new(service_svc(s, &ix, errors)));
    }
    for s in &cfg.service_entries {
        services.extend(service_entry_svcs(s, &ix, errors).into_iter().map(Arc::new));
    }
    let mut by_host = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        if let Some(prev) = by_host.insert(s.host.clone(), i) {
            errors.push(ConfigError::at(
                &s.origin,
                s.id.clone(),
                "metadata.name",
                format!(
                    "host {} is already defined by {}",
                    s.host, services[prev].id
                ),
            ));
        }
    }
    Registry {
        services,
        by_host: Arc::new(by_host),
    }
}

fn ep_from_workload(ix: &Index, w: &model::WorkloadEntrySpec, name: &str, ns: &str) -> Ep {
    let mut interner = ix.interner.borrow_mut();
    Ep {
        address: w.address.clone(),
        named_ports: interner.ports(&w.ports),
        labels: interner.labels(&w.labels),
        workload: name.to_string(),
        namespace: ns.to_string(),
    }
}

/// Deterministic content hash: the same config gives the same version anywhere.
fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn cluster_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
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

fn prepare(cfg: &Config) -> (Registry, Vec<ConfigError>) {
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

    /// [`translate_unversioned`] of this config.
    pub fn translate(&self, params: &ProxyParams) -> Result<pb::ProxyConfig, ConfigErrors> {
        translate_with(&self.config, &self.reg, self.errors.clone(), params)
    }

    /// [`check`] of this config. An endpoint update of a checked config
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

/// The host of an outbound cluster name (`outbound|port|subset|host`).
pub fn cluster_host(name: &str) -> Option<&str> {
    name.strip_prefix("outbound|")?.splitn(3, '|').nth(2)
}

/// The endpoints of one cluster: the service's endpoints that the subset's
/// labels select, on the service port's target.
fn load_assignment(
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
        })
        .collect();
    pb::ClusterLoadAssignment {
        cluster: name.to_string(),
        endpoints,
    }
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

impl Ctx<'_> {
    fn lb_settings(&self, host: &str, subset: &str, port: u32) -> Option<LoadBalancerSettings> {
        let dr = &self.drs.get(host)?.value.spec;
        let from = |tp: &Option<model::TrafficPolicy>| -> Option<LoadBalancerSettings> {
            let tp = tp.as_ref()?;
            tp.port_level_settings
                .iter()
                .find(|p| p.port.number == port)
                .and_then(|p| p.load_balancer.clone())
                .or_else(|| tp.load_balancer.clone())
        };
        let subset_tp = dr
            .subsets
            .iter()
            .find(|s| s.name == subset)
            .map(|s| &s.traffic_policy);
        subset_tp
            .and_then(from)
            .or_else(|| from(&dr.traffic_policy))
    }

    /// Makes (once) the cluster for host/port/subset and returns its name.
    fn cluster(&mut self, svc_idx: usize, port: u32, subset: &str) -> Result<String, String> {
        let svc = &self.reg.services[svc_idx];
        let name = cluster_name(port, subset, &svc.host);
        if self.clusters.contains_key(&name) {
            return Ok(name);
        }
        let sp = svc
            .port(port)
            .ok_or_else(|| format!("{} has no port {port}", svc.host))?
            .clone();
        let selector = if subset.is_empty() {
            Labels::new()
        } else {
            let dr = self
                .drs
                .get(&svc.host)
                .ok_or_else(|| format!("subset {subset}: no DestinationRule for {}", svc.host))?;
            dr.value
                .spec
                .subsets
                .iter()
                .find(|s| s.name == subset)
                .ok_or_else(|| {
                    format!(
                        "subset {subset} is not defined in DestinationRule {}",
                        dr.value.id()
                    )
                })?
                .labels
                .clone()
        };
        let mut cluster = pb::Cluster {
            name: name.clone(),
            protocol: sp.protocol.upstream() as i32,
            lb_policy: pb::LbPolicy::RoundRobin as i32,
            service_host: svc.host.clone(),
            service_name: svc.name.clone(),
            service_namespace: svc.namespace.clone(),
            ..Default::default()
        };
        if let Some(lb) = self.lb_settings(&svc.host, subset, port) {
            apply_lb(&mut cluster, &lb)?;
        } else if svc.client_ip_affinity {
            cluster.lb_policy = pb::LbPolicy::RingHash as i32;
            cluster.hash_policy = Some(pb::HashPolicy {
                key: Some(pb::hash_policy::Key::SourceIp(true)),
            });
        }
        let assignment = if self.params.check_only {
            pb::ClusterLoadAssignment {
                cluster: name.clone(),
                endpoints: Vec::new(),
            }
        } else {
            load_assignment(&name, svc, &sp, &selector)
        };
        self.assignments.insert(name.clone(), assignment);
        self.clusters.insert(name.clone(), cluster);
        Ok(name)
    }

    /// Resolves a route destination to a cluster. `listener_port` picks the
    /// service port when the destination names none and the service has several.
    fn destination(
        &mut self,
        d: &model::Destination,
        ns: &str,
        listener_port: Option<u32>,
    ) -> Result<String, String> {
        let host = resolve_host(&d.host, ns, &self.reg.by_host);
        let idx = *self
            .reg
            .by_host
            .get(&host)
            .ok_or_else(|| format!("host {} is not a known Service or ServiceEntry", d.host))?;
        let svc = &self.reg.services[idx];
        let port = match &d.port {
            Some(p) => p.number,
            None if svc.ports.len() == 1 => svc.ports[0].number,
            None => match listener_port.filter(|p| svc.port(*p).is_some()) {
                Some(p) => p,
                None => {
                    return Err(format!(
                        "{host} has several ports: set destination.port.number"
                    ));
                }
            },
        };
        if svc.port(port).is_none() {
            return Err(format!("{host} has no port {port}"));
        }
        self.cluster(idx, port, d.subset.as_deref().unwrap_or(""))
    }

    /// Does a VirtualService apply to this proxy for `gateway` ("mesh" for sidecars)?
    fn vs_gateways(vs: &model::VirtualService) -> Vec<String> {
        let ns = vs.namespace();
        if vs.spec.gateways.is_empty() {
            return vec!["mesh".into()];
        }
        vs.spec
            .gateways
            .iter()
            .map(|g| qualify_gateway(g, ns))
            .collect()
    }

    /// Translates a VirtualService's http routes for one listener.
    fn http_routes(
        &mut self,
        vs: &Sourced<model::VirtualService>,
        gateway: &str,
        listener_port: Option<u32>,
    ) -> Vec<pb::Route> {
        let ns = vs.value.namespace().to_string();
        let vs_gateways = Self::vs_gateways(&vs.value);
        let mut routes = Vec::new();
        for (ri, r) in vs.value.spec.http.iter().enumerate() {
            let field = format!("spec.http[{ri}]");
            let mut matches = Vec::new();
            let mut all_filtered = !r.matches.is_empty();
            for (mi, m) in r.matches.iter().enumerate() {
                let gws: Vec<String> = if m.gateways.is_empty() {
                    vs_gateways.clone()
                } else {
                    m.gateways.iter().map(|g| qualify_gateway(g, &ns)).collect()
                };
                if !gws.iter().any(|g| g == gateway) {
                    continue;
                }
                if !labels_match(&m.source_labels, &self.params.labels) {
                    continue;
                }
                if let (Some(p), Some(lp)) = (m.port, listener_port)
                    && gateway != "mesh"
                    && p != lp
                {
                    continue;
                }
                all_filtered = false;
                match to_route_match(m) {
                    Ok(rm) => matches.push(rm),
                    Err(e) => self.errors.push(ConfigError::at(
                        &vs.origin,
                        vs.value.id(),
                        &format!("{field}.match[{mi}].{}", e.0),
                        e.1,
                    )),
                }
            }
            if all_filtered {
                continue;
            }
            let mut route = pb::Route {
                name: r
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}.{ri}", vs.value.metadata.name)),
                matches,
                ..Default::default()
            };
            let mut req_ops = r.headers.as_ref().and_then(|h| h.request.clone());
            let mut resp_ops = r.headers.as_ref().and_then(|h| h.response.clone());
            let actions = [
                !r.route.is_empty(),
                r.redirect.is_some(),
                r.direct_response.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count();
            if actions != 1 {
                self.errors.push(ConfigError::at(
                    &vs.origin,
                    vs.value.id(),
                    &field,
                    "exactly one of route, redirect or directResponse is required".into(),
                ));
                continue;
            }
            if let Some(red) = &r.redirect {
                route.action = Some(pb::route::Action::Redirect(pb::Redirect {
                    uri: red.uri.clone().unwrap_or_default(),
                    authority: red.authority.clone().unwrap_or_default(),
                    scheme: red.scheme.clone().unwrap_or_default(),
                    port: red.port.unwrap_or(0),
                    status: red.redirect_code.unwrap_or(301),
                }));
            } else if let Some(dr) = &r.direct_response {
                route.action = Some(pb::route::Action::DirectResponse(pb::DirectResponse {
                    status: dr.status,
                    body: dr
                        .body
                        .as_ref()
                        .and_then(|b| b.string.clone())
                        .unwrap_or_default()
                        .into_bytes(),
                }));
            } else {
                let mut clusters = Vec::new();
                for (di, d) in r.route.iter().enumerate() {
                    match self.destination(&d.destination, &ns, listener_port) {
                        Ok(c) => clusters.push(pb::WeightedCluster {
                            cluster: c,
                            weight: d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 })
                                as u32,
                        }),
                        Err(m) => self.errors.push(ConfigError::at(
                            &vs.origin,
                            vs.value.id(),
                            &format!("{field}.route[{di}].destination"),
                            m,
                        )),
                    }
                    if let Some(h) = &d.headers {
                        if r.route.len() > 1 {
                            self.errors.push(ConfigError::at(
                                &vs.origin,
                                vs.value.id(),
                                &format!("{field}.route[{di}].headers"),
                                "headers on one of several weighted destinations are not supported by Bosun yet; set them on the route".into(),
                            ));
                        } else {
                            req_ops = merge_ops(req_ops, h.request.clone());
                            resp_ops = merge_ops(resp_ops, h.response.clone());
                        }
                    }
                }
                route.action = Some(pb::route::Action::Route(pb::RouteAction {
                    clusters,
                    uri_rewrite: r
                        .rewrite
                        .as_ref()
                        .and_then(|w| w.uri.clone())
                        .unwrap_or_default(),
                    authority_rewrite: r
                        .rewrite
                        .as_ref()
                        .and_then(|w| w.authority.clone())
                        .unwrap_or_default(),
                }));
            }
            route.request_headers = req_ops.map(to_ops);
            route.response_headers = resp_ops.map(to_ops);
            routes.push(route);
        }
        routes
    }

    fn tcp_routes(
        &mut self,
        vs: &Sourced<model::VirtualService>,
        gateway: &str,
        port: u32,
    ) -> Vec<pb::TcpRoute> {
        let ns = vs.value.namespace().to_string();
        let vs_gateways = Self::vs_gateways(&vs.value);
        let mut out = Vec::new();
        for (ri, r) in vs.value.spec.tcp.iter().enumerate() {
            let applies = r.matches.is_empty()
                || r.matches.iter().any(|m| {
                    let gws: Vec<String> = if m.gateways.is_empty() {
                        vs_gateways.clone()
                    } else {
                        m.gateways.iter().map(|g| qualify_gateway(g, &ns)).collect()
                    };
                    gws.iter().any(|g| g == gateway)
                        && m.port.is_none_or(|p| p == port)
                        && labels_match(&m.source_labels, &self.params.labels)
                });
            if !applies || (r.matches.is_empty() && !vs_gateways.iter().any(|g| g == gateway)) {
                continue;
            }
            let mut clusters = Vec::new();
            for (di, d) in r.route.iter().enumerate() {
                match self.destination(&d.destination, &ns, Some(port)) {
                    Ok(c) => clusters.push(pb::WeightedCluster {
                        cluster: c,
                        weight: d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 }) as u32,
                    }),
                    Err(m) => self.errors.push(ConfigError::at(
                        &vs.origin,
                        vs.value.id(),
                        &format!("spec.tcp[{ri}].route[{di}].destination"),
                        m,
                    )),
                }
            }
            out.push(pb::TcpRoute { clusters });
        }
        out
    }
}

fn qualify_gateway(g: &str, ns: &str) -> String {
    if g == "mesh" || g.contains('/') {
        g.to_string()
    } else {
        format!("{ns}/{g}")
    }
}

fn merge_ops(
    a: Option<model::HeaderOperations>,
    b: Option<model::HeaderOperations>,
) -> Option<model::HeaderOperations> {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(mut a), Some(b)) => {
            a.set.extend(b.set);
            a.add.extend(b.add);
            a.remove.extend(b.remove);
            Some(a)
        }
    }
}

fn to_ops(o: model::HeaderOperations) -> pb::HeaderOperations {
    pb::HeaderOperations {
        set: o.set.into_iter().collect(),
        add: o.add.into_iter().collect(),
        remove: o.remove,
    }
}

fn apply_lb(c: &mut pb::Cluster, lb: &LoadBalancerSettings) -> Result<(), String> {
    if let Some(simple) = &lb.simple {
        c.lb_policy = match simple.as_str() {
            "ROUND_ROBIN" | "UNSPECIFIED" => pb::LbPolicy::RoundRobin,
            "LEAST_REQUEST" | "LEAST_CONN" => pb::LbPolicy::LeastRequest,
            "RANDOM" => pb::LbPolicy::Random,
            other => {
                return Err(format!(
                    "loadBalancer.simple {other} is not supported (ROUND_ROBIN, LEAST_REQUEST, RANDOM)"
                ));
            }
        } as i32;
    }
    if let Some(ch) = &lb.consistent_hash {
        use pb::hash_policy::Key;
        let key = if let Some(h) = &ch.http_header_name {
            Key::HeaderName(h.to_ascii_lowercase())
        } else if let Some(ck) = &ch.http_cookie {
            Key::Cookie(pb::hash_policy::Cookie {
                name: ck.name.clone(),
                path: ck.path.clone().unwrap_or_default(),
                ttl_seconds: match &ck.ttl {
                    Some(t) => parse_duration_secs(t)?,
                    None => 0,
                },
            })
        } else if ch.use_source_ip == Some(true) {
            Key::SourceIp(true)
        } else if let Some(q) = &ch.http_query_parameter_name {
            Key::QueryParameter(q.clone())
        } else {
            return Err("consistentHash needs one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into());
        };
        c.hash_policy = Some(pb::HashPolicy { key: Some(key) });
        if let Some(m) = &ch.maglev {
            c.lb_policy = pb::LbPolicy::Maglev as i32;
            c.table_size = m.table_size.unwrap_or(0);
        } else {
            c.lb_policy = pb::LbPolicy::RingHash as i32;
            c.table_size = ch
                .ring_hash
                .as_ref()
                .and_then(|r| r.minimum_ring_size)
                .or(ch.minimum_ring_size)
                .unwrap_or(0);
        }
    }
    Ok(())
}

/// Checks a whole config the way every proxy will see it: translated for a
/// sidecar and for a gateway selected by every Gateway's selector, so each
/// route, server and destination is checked once. Errors are deduplicated.
pub fn check(cfg: &Config) -> Result<(), ConfigErrors> {
    let (reg, errors) = prepare(cfg);
    check_with(cfg, |params| {
        translate_with(cfg, &reg, errors.clone(), params)
    })
}

fn check_with(
    cfg: &Config,
    translate: impl Fn(&ProxyParams) -> Result<pb::ProxyConfig, ConfigErrors>,
) -> Result<(), ConfigErrors> {
    let mut errors: Vec<ConfigError> = Vec::new();
    for mode in [ProxyMode::Sidecar, ProxyMode::Gateway] {
        let mut params = ProxyParams {
            mode,
            check_only: true,
            ..Default::default()
        };
        for g in &cfg.gateways {
            params.labels.extend(g.value.spec.selector.clone());
        }
        if let Err(e) = translate(&params) {
            for err in e.0 {
                if !errors.contains(&err) {
                    errors.push(err);
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Istio durations: "10s", "1.5s", "100ms", "1h", "2m".
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid duration {s:?} (e.g. 10s, 500ms, 1h)");
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .ok_or_else(bad)?;
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    Ok(secs.ceil() as u64)
}

type FieldError = (String, String);

fn to_string_match(m: &StringMatch, field: &str) -> Result<Option<pb::StringMatch>, FieldError> {
    use pb::string_match::Kind;
    let set = [&m.exact, &m.prefix, &m.regex]
        .iter()
        .filter(|x| x.is_some())
        .count();
    if set > 1 {
        return Err((
            field.to_string(),
            "set only one of exact, prefix, regex".into(),
        ));
    }
    let kind = if let Some(e) = &m.exact {
        Kind::Exact(e.clone())
    } else if let Some(p) = &m.prefix {
        Kind::Prefix(p.clone())
    } else if let Some(r) = &m.regex {
        Kind::Regex(r.clone())
    } else {
        return Ok(None);
    };
    Ok(Some(pb::StringMatch { kind: Some(kind) }))
}

fn to_route_match(m: &HttpMatchRequest) -> Result<pb::RouteMatch, FieldError> {
    let req = |o: &Option<StringMatch>, f: &str| -> Result<Option<pb::StringMatch>, FieldError> {
        match o {
            None => Ok(None),
            Some(sm) => to_string_match(sm, f)?
                .map(Some)
                .ok_or_else(|| (f.to_string(), "set one of exact, prefix, regex".into())),
        }
    };
    let headers = |map: &BTreeMap<String, StringMatch>,
                   f: &str|
     -> Result<Vec<pb::HeaderMatch>, FieldError> {
        map.iter()
            .map(|(k, v)| {
                Ok(pb::HeaderMatch {
                    name: if f == "queryParams" {
                        k.clone()
                    } else {
                        k.to_ascii_lowercase()
                    },
                    value: to_string_match(v, &format!("{f}.{k}"))?,
                })
            })
            .collect()
    };
    Ok(pb::RouteMatch {
        uri: req(&m.uri, "uri")?,
        authority: req(&m.authority, "authority")?,
        method: req(&m.method, "method")?,
        scheme: req(&m.scheme, "scheme")?,
        headers: headers(&m.headers, "headers")?,
        without_headers: headers(&m.without_headers, "withoutHeaders")?,
        query_params: headers(&m.query_params, "queryParams")?,
        port: m.port.unwrap_or(0),
        ignore_uri_case: m.ignore_uri_case,
    })
}

/// Does a server host (`host`, `ns/host`, `*`, `*.suffix`) admit this VS host?
fn server_host_admits(server_host: &str, vs_ns: &str, vs_host: &str) -> bool {
    let (ns, h) = server_host.split_once('/').unwrap_or(("*", server_host));
    if ns != "*" && ns != "." && ns != vs_ns {
        return false;
    }
    host_matches(h, vs_host) || host_matches(vs_host, h)
}

fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => pattern == host,
    }
}

fn sidecar(ctx: &mut Ctx<'_>, out: &mut pb::ProxyConfig) {
    let p = ctx.params.clone();
    // Which VirtualService (mesh-bound) owns each host: first wins, as in Istio.
    let mut vs_for_host: BTreeMap<String, usize> = BTreeMap::new();
    for (i, vs) in ctx.cfg.virtual_services.iter().enumerate() {
        if !Ctx::vs_gateways(&vs.value).iter().any(|g| g == "mesh")
            || !exported(&vs.value.spec.export_to, vs.value.namespace(), &p.namespace)
        {
            continue;
        }
        for h in &vs.value.spec.hosts {
            let host = resolve_host(h, vs.value.namespace(), &ctx.reg.by_host);
            vs_for_host.entry(host).or_insert(i);
        }
    }
    let mut vhosts = Vec::new();
    let mut tcp_ports: BTreeMap<u32, String> = BTreeMap::new();
    let mut covered = BTreeSet::new();
    let scope = EgressScope::for_proxy(ctx.cfg, &p);
    // The check sees every service, but two TCP services on one port clash
    // only in a proxy that sees both: it judges that as a proxy of its
    // namespace would, scoped.
    let clash_scope = EgressScope::for_proxy(
        ctx.cfg,
        &ProxyParams {
            check_only: false,
            ..p.clone()
        },
    );
    let reg = ctx.reg;
    for (si, svc) in reg.services.iter().enumerate() {
        if !scope.admits(&svc.namespace, &svc.host)
            || !exported(&svc.export_to, &svc.namespace, &p.namespace)
        {
            continue;
        }
        let may_clash = clash_scope.admits(&svc.namespace, &svc.host);
        let http_ports: Vec<&SvcPort> = svc.ports.iter().filter(|p| p.protocol.is_http()).collect();
        for sp in &svc.ports {
            let vs_idx = vs_for_host.get(&svc.host).copied();
            if !sp.protocol.is_http() {
                // (Outside clash_scope a service is checked for its routes only.)
                if may_clash {
                    if let Some(prev) = tcp_ports.get(&sp.number) {
                        ctx.errors.push(ConfigError::at(
                            &svc.origin,
                            svc.id.clone(),
                            "spec.ports",
                            format!(
                                "TCP port {} is also used by {prev}: without transparent capture the sidecar binds one local listener per TCP port",
                                sp.number
                            ),
                        ));
                        continue;
                    }
                    tcp_ports.insert(sp.number, svc.host.clone());
                }
                let mut tcp_routes = Vec::new();
                if let Some(i) = vs_idx {
                    let vs = &ctx.cfg.virtual_services[i];
                    tcp_routes = ctx.tcp_routes(vs, "mesh", sp.number);
                }
                if tcp_routes.is_empty() {
                    match ctx.cluster(si, sp.number, "") {
                        Ok(c) => tcp_routes.push(pb::TcpRoute {
                            clusters: vec![pb::WeightedCluster {
                                cluster: c,
                                weight: 100,
                            }],
                        }),
                        Err(m) => ctx.errors.push(ConfigError::at(
                            &svc.origin,
                            svc.id.clone(),
                            "spec.ports",
                            m,
                        )),
                    }
                }
                out.listeners.push(pb::Listener {
                    name: format!("outbound_tcp_{}", sp.number),
                    address: p.outbound_address.clone(),
                    port: sp.number,
                    protocol: pb::ListenerProtocol::Tcp as i32,
                    direction: pb::TrafficDirection::Outbound as i32,
                    route_configuration: String::new(),
                    tcp_routes,
                });
                continue;
            }
            let mut domains = vec![format!("{}:{}", svc.host, sp.number)];
            let short = short_names(svc);
            for s in &short {
                domains.push(format!("{s}:{}", sp.number));
            }
            if sp.number == 80 || http_ports.len() == 1 {
                domains.push(svc.host.clone());
                domains.extend(short.iter().cloned());
            }
            let mut routes = Vec::new();
            if let Some(i) = vs_idx {
                covered.insert(i);
                let vs = &ctx.cfg.virtual_services[i];
                routes = ctx.http_routes(vs, "mesh", Some(sp.number));
                // Routes bound to other ports do not apply to this one.
                routes.retain(|r| {
                    r.matches.is_empty()
                        || r.matches.iter().any(|m| m.port == 0 || m.port == sp.number)
                });
            }
            if routes.is_empty() {
                match ctx.cluster(si, sp.number, "") {
                    Ok(c) => routes.push(route_all_to("default", c)),
                    Err(m) => ctx.errors.push(ConfigError::at(
                        &svc.origin,
                        svc.id.clone(),
                        "spec.ports",
                        m,
                    )),
                }
            }
            vhosts.push(pb::VirtualHost {
                name: format!("{}:{}", svc.host, sp.number),
                domains,
                routes,
            });
        }
    }
    // VirtualServices for hosts that are not services (e.g. a direct response
    // or a redirect on a made-up host) still get a virtual host.
    for (host, i) in &vs_for_host {
        if covered.contains(i) || ctx.reg.by_host.contains_key(host) {
            continue;
        }
        let vs = &ctx.cfg.virtual_services[*i];
        let routes = ctx.http_routes(vs, "mesh", None);
        if !routes.is_empty() {
            vhosts.push(pb::VirtualHost {
                name: host.clone(),
                domains: vec![host.clone()],
                routes,
            });
        }
    }
    out.listeners.push(pb::Listener {
        name: "outbound_http".into(),
        address: p.outbound_address.clone(),
        port: p.outbound_port,
        protocol: pb::ListenerProtocol::Http as i32,
        direction: pb::TrafficDirection::Outbound as i32,
        route_configuration: "outbound".into(),
        tcp_routes: vec![],
    });
    out.route_configurations.push(pb::RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vhosts,
    });
    if let Some((addr, port, app_port)) = p.inbound {
        let cluster = format!("inbound|{app_port}||");
        ctx.clusters.insert(
            cluster.clone(),
            pb::Cluster {
                name: cluster.clone(),
                protocol: pb::UpstreamProtocol::Unspecified as i32,
                lb_policy: pb::LbPolicy::RoundRobin as i32,
                service_namespace: p.namespace.clone(),
                service_name: p.labels.get("app").cloned().unwrap_or_default(),
                ..Default::default()
            },
        );
        ctx.assignments.insert(
            cluster.clone(),
            pb::ClusterLoadAssignment {
                cluster: cluster.clone(),
                endpoints: vec![pb::Endpoint {
                    address: "127.0.0.1".into(),
                    port: app_port,
                    labels: p.labels.clone().into_iter().collect(),
                    workload: String::new(),
                    namespace: p.namespace.clone(),
                }],
            },
        );
        out.listeners.push(pb::Listener {
            name: "inbound_http".into(),
            address: addr,
            port,
            protocol: pb::ListenerProtocol::Http as i32,
            direction: pb::TrafficDirection::Inbound as i32,
            route_configuration: "inbound".into(),
            tcp_routes: vec![],
        });
        out.route_configurations.push(pb::RouteConfiguration {
            name: "inbound".into(),
            virtual_hosts: vec![pb::VirtualHost {
                name: "inbound".into(),
                domains: vec!["*".into()],
                routes: vec![route_all_to("inbound", cluster)],
            }],
        });
    }
}

/// A route that sends every request to one cluster.
fn route_all_to(name: &str, cluster: String) -> pb::Route {
    pb::Route {
        name: name.into(),
        matches: vec![],
        action: Some(pb::route::Action::Route(pb::RouteAction {
            clusters: vec![pb::WeightedCluster {
                cluster,
                weight: 100,
            }],
            ..Default::default()
        })),
        request_headers: None,
        response_headers: None,
    }
}

/// `exportTo`: empty or `*` is every namespace, `.` the resource's own.
fn exported(export_to: &[String], resource_ns: &str, proxy_ns: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || (e == "." && resource_ns == proxy_ns) || e == proxy_ns)
}

/// What a sidecar may reach, from Istio's `Sidecar` resource: the one in
/// the proxy's namespace whose `workloadSelector` matches it, else the
/// namespace's selector-less one, else the mesh-wide one in `istio-system`.
/// Without any, everything.
struct EgressScope {
    /// (namespace pattern, host pattern); None: no Sidecar applies.
    hosts: Option<Vec<(String, String)>>,
}

impl EgressScope {
    fn for_proxy(cfg: &Config, p: &ProxyParams) -> EgressScope {
        if p.check_only {
            return EgressScope { hosts: None };
        }
        fn in_ns<'a>(
            cfg: &'a Config,
            ns: &'a str,
        ) -> impl Iterator<Item = &'a Sourced<model::Sidecar>> {
            cfg.sidecars
                .iter()
                .filter(move |s| s.value.namespace() == ns)
        }
        let selected = in_ns(cfg, &p.namespace)
            .find(|s| {
                s.value
                    .spec
                    .workload_selector
                    .as_ref()
                    .is_some_and(|w| labels_match(&w.labels, &p.labels))
            })
            .or_else(|| in_ns(cfg, &p.namespace).find(|s| s.value.spec.workload_selector.is_none()))
            .or_else(|| {
                in_ns(cfg, "istio-system").find(|s| s.value.spec.workload_selector.is_none())
            });
        let hosts = selected.map(|s| {
            // `.` is the proxy's own namespace (for a Sidecar in its
            // namespace, the Sidecar's; for the mesh-wide one, still the
            // proxy's, as in Istio).
            let own = p.namespace.clone();
            s.value
                .spec
                .egress
                .iter()
                .flat_map(|e| e.hosts.iter())
                .map(|h| {
                    let (ns, host) = h.split_once('/').unwrap_or(("*", h.as_str()));
                    let ns = if ns == "." {
                        own.clone()
                    } else {
                        ns.to_string()
                    };
                    (ns, host.to_string())
                })
                .collect()
        });
        EgressScope { hosts }
    }

    fn admits(&self, ns: &str, host: &str) -> bool {
        let Some(hosts) = &self.hosts else {
            return true;
        };
        hosts
            .iter()
            .any(|(n, h)| n != "~" && (n == "*" || n == ns) && host_matches(h, host))
    }
}

fn short_names(svc: &Svc) -> Vec<String> {
    match svc.host.strip_suffix(".svc.cluster.local") {
        Some(base) => {
            let mut v = vec![format!("{base}.svc"), base.to_string()];
            if svc.namespace == svc.host.split('.').nth(1).unwrap_or("") {
                v.push(svc.name.clone());
            }
            v
        }
        None => vec![],
    }
}

fn gateway(ctx: &mut Ctx<'_>, out: &mut pb::ProxyConfig) {
    let p = ctx.params.clone();
    // (port) -> (protocol, bind, [(gateway id, server hosts)])
    struct PortServers {
        tcp: bool,
        bind: String,
        servers: Vec<(String, Vec<String>)>,
    }
    let mut ports: BTreeMap<u32, PortServers> = BTreeMap::new();
    for g in &ctx.cfg.gateways {
        let gw = &g.value;
        if !labels_match(&gw.spec.selector, &p.labels) {
            continue;
        }
        let gid = format!("{}/{}", gw.namespace(), gw.metadata.name);
        for (i, s) in gw.spec.servers.iter().enumerate() {
            let field = format!("spec.servers[{i}].port.protocol");
            let proto = match select_protocol(Some(&s.port.protocol), None) {
                Ok(pr) => pr,
                Err(m) => {
                    ctx.errors
                        .push(ConfigError::at(&g.origin, gw.id(), &field, m));
                    continue;
                }
            };
            let bind = s.bind.clone().unwrap_or_else(|| p.gateway_address.clone());
            let entry = ports.entry(s.port.number).or_insert(PortServers {
                tcp: !proto.is_http(),
                bind,
                servers: Vec::new(),
            });
            if entry.tcp == proto.is_http() {
                ctx.errors.push(ConfigError::at(
                    &g.origin,
                    gw.id(),
                    &field,
                    format!("port {} is declared both as TCP and as HTTP", s.port.number),
                ));
                continue;
            }
            entry.servers.push((gid.clone(), s.hosts.clone()));
        }
    }
    for (port, ps) in ports {
        if ps.tcp {
            let mut tcp_routes = Vec::new();
            for (gid, hosts) in &ps.servers {
                for vs in &ctx.cfg.virtual_services {
                    let ns = vs.value.namespace();
                    let admitted = vs
                        .value
                        .spec
                        .hosts
                        .iter()
                        .any(|h| hosts.iter().any(|sh| server_host_admits(sh, ns, h)));
                    if admitted {
                        let r = ctx.tcp_routes(vs, gid, port);
                        tcp_routes.extend(r);
                    }
                }
            }
            out.listeners.push(pb::Listener {
                name: format!("gateway_tcp_{port}"),
                address: ps.bind,
                port,
                protocol: pb::ListenerProtocol::Tcp as i32,
                direction: pb::TrafficDirection::Gateway as i32,
                route_configuration: String::new(),
                tcp_routes,
            });
            continue;
        }
        let rc = format!("http.{port}");
        let mut vhosts: Vec<pb::VirtualHost> = Vec::new();
        for (gid, hosts) in &ps.servers {
            for vs in &ctx.cfg.virtual_services {
                let ns = vs.value.namespace().to_string();
                let vs_hosts: Vec<String> = vs
                    .value
                    .spec
                    .hosts
                    .iter()
                    .filter(|h| hosts.iter().any(|sh| server_host_admits(sh, &ns, h)))
                    .cloned()
                    .collect();
                if vs_hosts.is_empty() {
                    continue;
                }
                let routes = ctx.http_routes(vs, gid, Some(port));
                if routes.is_empty() {
                    continue;
                }
                for h in vs_hosts {
                    if let Some(existing) = vhosts.iter_mut().find(|v| v.name == h) {
                        existing.routes.extend(routes.clone());
                    } else {
                        vhosts.push(pb::VirtualHost {
                            name: h.clone(),
                            domains: vec![h.clone()],
                            routes: routes.clone(),
                        });
                    }
                }
            }
        }
        out.listeners.push(pb::Listener {
            name: format!("gateway_http_{port}"),
            address: ps.bind,
            port,
            protocol: pb::ListenerProtocol::Http as i32,
            direction: pb::TrafficDirection::Gateway as i32,
            route_configuration: rc.clone(),
            tcp_routes: vec![],
        });
        out.route_configurations.push(pb::RouteConfiguration {
            name: rc,
            virtual_hosts: vhosts,
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::load::load_sources;

    const CANARY: &str = include_str!("../../examples/canary/canary.yaml");

    /// A Service with an EndpointSlice, its Pods, and a subset on their labels.
    pub(crate) const SHOP: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-x, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9080}]
endpoints:
- addresses: [10.0.0.1]
  targetRef: {kind: Pod, name: reviews-v1-abc, namespace: shop, uid: u1}
- addresses: [10.0.0.2]
  targetRef: {kind: Pod, name: reviews-v2-def, namespace: shop, uid: u2}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-abc, namespace: shop, labels: {app: reviews, version: v1}}
spec: {containers: [{name: app, image: reviews:1}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2-def, namespace: shop, labels: {app: reviews, version: v2}}
spec: {containers: [{name: app, image: reviews:2}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v2}}]}]
"#;

    fn gw_params() -> ProxyParams {
        ProxyParams {
            mode: ProxyMode::Gateway,
            labels: [("istio".to_string(), "ingressgateway".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn canary_translates_for_the_gateway() {
        let cfg = load_sources(&[("canary.yaml".into(), CANARY.into())]).expect("parses");
        let out = translate(&cfg, &gw_params()).expect("valid");
        assert_eq!(out.listeners.len(), 1);
        let names: Vec<_> = out.clusters.iter().map(|c| c.name.as_str()).collect();
        assert!(
            names.contains(&"outbound|8080|v1|reviews.demo.svc.cluster.local"),
            "{names:?}"
        );
        let v1 = out
            .load_assignments
            .iter()
            .find(|a| a.cluster.contains("|v1|"))
            .expect("v1 endpoints");
        assert_eq!(v1.endpoints.len(), 1);
        assert_eq!(
            v1.endpoints[0].labels.get("version").map(String::as_str),
            Some("v1")
        );
        // Same input, same version: versions are content hashes.
        let again = translate(&cfg, &gw_params()).expect("valid");
        assert_eq!(out.version, again.version);
    }

    #[test]
    fn undefined_subset_is_an_error_naming_the_field() {
        let bad = CANARY.replace("subset: v2", "subset: v9");
        let cfg = load_sources(&[("canary.yaml".into(), bad)]).expect("parses");
        let err = translate(&cfg, &gw_params()).expect_err("v9 is undefined");
        let e = &err.0[0];
        assert!(e.resource.starts_with("VirtualService/demo/"), "{e}");
        assert!(e.field.contains("route[1].destination"), "{e}");
        assert!(e.message.contains("v9"), "{e}");
    }

    const POLICY: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: ns}
spec:
  selector: {app: ratings}
  ports:
  - {name: http, port: 9080, targetPort: 8080}
  - {name: grpc-api, port: 9090}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-vm-1, namespace: ns}
spec:
  address: 10.0.0.1
  labels: {app: ratings, version: v1}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-vm-2, namespace: ns}
spec:
  address: 10.0.0.2
  ports: {http: 18080}
  labels: {app: ratings, version: v2}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other, namespace: ns}
spec:
  address: 10.0.0.9
  labels: {app: other}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: ns}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: X-User, maglev: {tableSize: 1009}}
"#;

    #[test]
    fn policies_merge_subset_over_port_over_top_and_services_select_workload_entries() {
        let cfg = load_sources(&[("p.yaml".into(), POLICY.into())]).expect("parses");
        let out = translate(&cfg, &ProxyParams::default()).expect("valid");
        let cluster = |name: &str| {
            out.clusters
                .iter()
                .find(|c| c.name == name)
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        let host = "ratings.ns.svc.cluster.local";
        assert_eq!(
            cluster(&format!("outbound|9080||{host}")).lb_policy,
            pb::LbPolicy::Random as i32
        );
        assert_eq!(
            cluster(&format!("outbound|9090||{host}")).lb_policy,
            pb::LbPolicy::LeastRequest as i32
        );
        assert_eq!(
            cluster(&format!("outbound|9090||{host}")).protocol,
            pb::UpstreamProtocol::Http2 as i32
        );
        // Subsets are only built when routed to; build them through the registry.
        let params = ProxyParams {
            mode: ProxyMode::Sidecar,
            ..Default::default()
        };
        let eps = |c: &str| -> Vec<(String, u32)> {
            out.load_assignments
                .iter()
                .find(|a| a.cluster == c)
                .map(|a| {
                    a.endpoints
                        .iter()
                        .map(|e| (e.address.clone(), e.port))
                        .collect()
                })
                .unwrap_or_default()
        };
        // The Service selects the two ratings WorkloadEntries, not "other";
        // a named WorkloadEntry port wins over targetPort.
        assert_eq!(
            eps(&format!("outbound|9080||{host}")),
            vec![
                ("10.0.0.1".to_string(), 8080),
                ("10.0.0.2".to_string(), 18080)
            ]
        );
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: ns}\nspec:\n  hosts: [ratings]\n  http:\n  - route:\n    - {destination: {host: ratings, subset: v1, port: {number: 9080}}, weight: 50}\n    - {destination: {host: ratings, subset: v2, port: {number: 9080}}, weight: 50}\n";
        let cfg = load_sources(&[
            ("p.yaml".into(), POLICY.into()),
            ("vs.yaml".into(), vs.into()),
        ])
        .expect("parses");
        let out = translate(&cfg, &params).expect("valid");
        let v2 = out
            .clusters
            .iter()
            .find(|c| c.name == format!("outbound|9080|v2|{host}"))
            .expect("v2");
        assert_eq!(v2.lb_policy, pb::LbPolicy::Maglev as i32);
        assert_eq!(v2.table_size, 1009);
        assert_eq!(
            v2.hash_policy.as_ref().and_then(|h| h.key.clone()),
            Some(pb::hash_policy::Key::HeaderName("x-user".into()))
        );
        let v1 = out
            .clusters
            .iter()
            .find(|c| c.name == format!("outbound|9080|v1|{host}"))
            .expect("v1");
        assert_eq!(
            v1.lb_policy,
            pb::LbPolicy::Random as i32,
            "top-level policy"
        );
    }

    #[test]
    fn weights_must_sum_to_100() {
        let bad = CANARY.replace("weight: 10", "weight: 20");
        let cfg = load_sources(&[("canary.yaml".into(), bad)]).expect("parses");
        let err = translate(&cfg, &gw_params()).expect_err("110");
        assert!(err.0[0].message.contains("sum to 110"), "{}", err.0[0]);
        assert_eq!(err.0[0].field, "spec.http[0].route");
    }

    /// The service hosts of the clusters a sidecar in `ns` receives.
    fn cluster_hosts(cfg: &Config, ns: &str) -> Vec<String> {
        let p = ProxyParams {
            namespace: ns.into(),
            ..Default::default()
        };
        let out = translate(cfg, &p).expect("valid");
        out.clusters
            .iter()
            .map(|c| c.service_host.clone())
            .collect()
    }

    #[test]
    fn sidecar_egress_and_export_to_scope_what_a_proxy_receives() {
        let y = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: b}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: c}
spec:
  hosts: [private.c.internal]
  exportTo: ["."]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: a}
spec:
  egress:
  - hosts: ["./*"]
"#;
        let cfg = load_sources(&[("s.yaml".into(), y.into())]).expect("parses");
        assert_eq!(cfg.sidecars.len(), 1, "{:?}", cfg.sidecars);
        let hosts = |ns: &str| cluster_hosts(&cfg, ns);
        // Namespace a's Sidecar: only its own namespace.
        assert_eq!(hosts("a"), vec!["web.a.svc.cluster.local".to_string()]);
        // Namespace b: no Sidecar, but c's private entry is not exported to it.
        assert_eq!(
            hosts("b"),
            vec![
                "db.b.svc.cluster.local".to_string(),
                "web.a.svc.cluster.local".to_string()
            ]
        );
        assert!(hosts("c").contains(&"private.c.internal".to_string()));
    }

    #[test]
    fn a_mesh_wide_sidecar_scopes_each_proxy_to_its_own_namespace_and_the_check_sees_all() {
        let y = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: b}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec:
  egress:
  - hosts: ["./*", "istio-system/*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: b}
spec:
  hosts: [db]
  http: [{route: [{destination: {host: db, subset: v9}}]}]
"#;
        let cfg = load_sources(&[("s.yaml".into(), y.into())]).expect("parses");
        let fixed = y.replace(", subset: v9", "");
        let good = load_sources(&[("s.yaml".into(), fixed)]).expect("parses");
        let hosts = |ns: &str| cluster_hosts(&good, ns);
        // `.` in the mesh-wide Sidecar is each proxy's own namespace.
        assert_eq!(hosts("a"), vec!["web.a.svc.cluster.local".to_string()]);
        assert_eq!(hosts("b"), vec!["db.b.svc.cluster.local".to_string()]);
        // The check is not scoped: b's bad route is refused although the
        // check's proxy (namespace default) would not see db.
        let err = check(&cfg).expect_err("subset v9 is undefined");
        assert!(
            err.0.iter().any(|e| e.resource == "VirtualService/b/db"),
            "{err}"
        );
        check(&good).expect("valid");
        // Two TCP services on one port clash only where one proxy sees both:
        // scoped to their namespaces they do not; without the Sidecar they do.
        let redis = |ns: &str| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: redis, namespace: {ns}}}\nspec: {{ports: [{{name: tcp, port: 6379}}]}}\n"
            )
        };
        let two = format!(
            "{}{}{}",
            y.replace(", subset: v9", ""),
            redis("a"),
            redis("b")
        );
        let scoped = load_sources(&[("s.yaml".into(), two.clone())]).expect("parses");
        check(&scoped).expect("each proxy sees one redis");
        // The same Sidecar in another namespace scopes nobody here.
        let unscoped_yaml = two.replace(
            "metadata: {name: default, namespace: istio-system}",
            "metadata: {name: default, namespace: elsewhere}",
        );
        let unscoped = load_sources(&[("s.yaml".into(), unscoped_yaml)]).expect("parses");
        let err = check(&unscoped).expect_err("a proxy in default sees both");
        assert!(err.to_string().contains("TCP port 6379"), "{err}");
    }

    #[test]
    fn export_to_dot_keeps_routing_and_policies_in_their_namespace() {
        let y = r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: b}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: b}
spec:
  host: api
  exportTo: ["."]
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: b}
spec:
  hosts: [api]
  exportTo: ["."]
  http:
  - route: [{destination: {host: api}}]
    headers: {request: {set: {x-from-b-vs: "1"}}}
"#;
        let cfg = load_sources(&[("e.yaml".into(), y.into())]).expect("parses");
        let view = |ns: &str| {
            let p = ProxyParams {
                namespace: ns.into(),
                ..Default::default()
            };
            let out = translate(&cfg, &p).expect("valid");
            let lb = out.clusters[0].lb_policy;
            let vs_applied = out.route_configurations[0].virtual_hosts[0].routes[0]
                .request_headers
                .is_some();
            (lb, vs_applied)
        };
        assert_eq!(view("b"), (pb::LbPolicy::Random as i32, true));
        assert_eq!(view("a"), (pb::LbPolicy::RoundRobin as i32, false));
    }

    #[test]
    fn endpoint_slice_endpoints_take_their_pods_labels_for_subsets() {
        let y = SHOP;
        let cfg = load_sources(&[("p.yaml".into(), y.into())]).expect("parses");
        let p = ProxyParams {
            namespace: "shop".into(),
            ..Default::default()
        };
        let out = translate(&cfg, &p).expect("valid");
        let v2 = out
            .load_assignments
            .iter()
            .find(|a| a.cluster == "outbound|9080|v2|reviews.shop.svc.cluster.local")
            .expect("v2 subset");
        let addrs: Vec<&str> = v2.endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(addrs, vec!["10.0.0.2"]);
        assert_eq!(v2.endpoints[0].workload, "reviews-v2-def");
    }

    #[test]
    fn client_ip_affinity_hashes_on_the_source_address_unless_a_destination_rule_decides() {
        let svc = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}\n  ports: [{{name: http, port: 80}}]\n---\n"
            )
        };
        let y = format!(
            "{}{}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: b, namespace: shop}}\nspec: {{host: b, trafficPolicy: {{loadBalancer: {{simple: LEAST_REQUEST}}}}}}\n",
            svc("a"),
            svc("b")
        );
        let cfg = load_sources(&[("p.yaml".into(), y)]).expect("parses");
        let out = translate(&cfg, &ProxyParams::default()).expect("valid");
        let cluster = |host: &str| {
            out.clusters
                .iter()
                .find(|c| c.service_host == host)
                .cloned()
                .expect("cluster")
        };
        let a = cluster("a.shop.svc.cluster.local");
        assert_eq!(a.lb_policy, pb::LbPolicy::RingHash as i32);
        assert_eq!(
            a.hash_policy.and_then(|h| h.key),
            Some(pb::hash_policy::Key::SourceIp(true))
        );
        let b = cluster("b.shop.svc.cluster.local");
        assert_eq!(b.lb_policy, pb::LbPolicy::LeastRequest as i32);
        // Anything else is refused with the field named.
        let bad = svc("c").replace("ClientIP\n", "Sticky\n");
        let cfg = load_sources(&[("p.yaml".into(), bad)]).expect("parses");
        let err = translate(&cfg, &ProxyParams::default()).expect_err("refused");
        assert!(err.to_string().contains("spec.sessionAffinity"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("10s"), Ok(10));
        assert_eq!(parse_duration_secs("1h"), Ok(3600));
        assert_eq!(parse_duration_secs("500ms"), Ok(1));
        assert!(parse_duration_secs("ten").is_err());
    }
}
