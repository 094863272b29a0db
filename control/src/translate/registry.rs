//! The service registry: Services and ServiceEntries with their ports
//! (and Istio's protocol selection) and endpoints, by host.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bosun_xds_proto::config as pb;

use crate::error::ConfigError;
use crate::model::{self, Config, Labels, Origin, Sourced};
use crate::services::{KubeIndex, Live, Liveness, liveness, session_affinity};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PortProtocol {
    Http,
    Http2,
    Grpc,
    Tcp,
    /// HTTPS or TLS from the app: opaque, routed by SNI under capture.
    Tls,
    /// No protocol declared: sniffed under capture, opaque TCP otherwise.
    Unknown,
}

impl PortProtocol {
    pub(super) fn is_http(self) -> bool {
        matches!(
            self,
            PortProtocol::Http | PortProtocol::Http2 | PortProtocol::Grpc
        )
    }
    pub(super) fn upstream(self) -> pb::UpstreamProtocol {
        match self {
            PortProtocol::Http => pb::UpstreamProtocol::Http1,
            PortProtocol::Http2 | PortProtocol::Grpc => pb::UpstreamProtocol::Http2,
            PortProtocol::Tcp | PortProtocol::Tls => pb::UpstreamProtocol::Tcp,
            // Sniffed under capture: HTTP goes up as it came.
            PortProtocol::Unknown => pb::UpstreamProtocol::Unspecified,
        }
    }
}

/// Istio's protocol selection: explicit protocol/appProtocol, else the port name prefix.
pub(super) fn select_protocol(
    explicit: Option<&str>,
    name: Option<&str>,
) -> Result<PortProtocol, String> {
    let from = |p: &str| -> Option<PortProtocol> {
        match p.to_ascii_lowercase().as_str() {
            "http" => Some(PortProtocol::Http),
            "http2" | "kubernetes.io/h2c" | "h2c" => Some(PortProtocol::Http2),
            "grpc" | "grpc-web" => Some(PortProtocol::Grpc),
            "tcp" | "mongo" | "mysql" | "redis" => Some(PortProtocol::Tcp),
            // TLS from the app (HTTPS, TLS) is opaque to a sidecar: its bytes
            // go through as TCP, by address, or by SNI under capture.
            "https" | "tls" => Some(PortProtocol::Tls),
            _ => None,
        }
    };
    if let Some(p) = explicit {
        return match from(p) {
            Some(proto) => Ok(proto),
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
    // Sniffed under capture (as Istio does); without capture, opaque TCP.
    Ok(PortProtocol::Unknown)
}

#[derive(Debug, Clone)]
pub(super) struct SvcPort {
    pub(super) number: u32,
    name: String,
    pub(super) protocol: PortProtocol,
    target: Option<model::IntOrString>,
}

#[derive(Debug, Clone)]
pub(super) struct Ep {
    pub(super) address: String,
    /// Port by service port name (EndpointSlice ports, WorkloadEntry ports).
    named_ports: Arc<BTreeMap<String, u32>>,
    pub(super) labels: Arc<Labels>,
    pub(super) workload: String,
    pub(super) namespace: String,
    /// region/zone/subzone; empty when unknown.
    pub(super) locality: String,
    /// Its service account (Pod `serviceAccountName`, WorkloadEntry
    /// `serviceAccount`); empty when unknown.
    pub(super) service_account: String,
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
pub(super) struct Svc {
    pub(super) host: String,
    pub(super) name: String,
    pub(super) namespace: String,
    /// ServiceEntry `exportTo`; empty: every namespace.
    pub(super) export_to: Vec<String>,
    pub(super) ports: Vec<SvcPort>,
    pub(super) endpoints: Vec<Ep>,
    pub(super) origin: Origin,
    pub(super) id: String,
    /// A Service's `sessionAffinity: ClientIP`.
    pub(super) client_ip_affinity: bool,
    /// ServiceEntry `resolution: DNS` / `DNS_ROUND_ROBIN`: endpoint
    /// addresses are names the proxy resolves.
    pub(super) dns: pb::DnsLookup,
    /// Virtual IPs: a Service's ClusterIPs, a ServiceEntry's `addresses`
    /// (single IPs; CIDRs are refused).
    pub(super) addresses: Vec<String>,
    /// ServiceEntry `resolution: NONE`: to the original destination.
    pub(super) original_dst: bool,
}

impl Svc {
    pub(super) fn port(&self, number: u32) -> Option<&SvcPort> {
        self.ports.iter().find(|p| p.number == number)
    }
    pub(super) fn endpoint_port(&self, ep: &Ep, port: &SvcPort) -> u32 {
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

pub(super) fn labels_match(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Istio's short-name expansion: `reviews` in namespace `ns` is
/// `reviews.ns.svc.cluster.local`; `reviews.other` is `reviews.other.svc.cluster.local`.
pub(super) fn resolve_host(host: &str, namespace: &str, known: &HashMap<String, usize>) -> String {
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
pub(super) struct Registry {
    pub(super) services: Vec<Arc<Svc>>,
    pub(super) by_host: Arc<HashMap<String, usize>>,
    /// Hosts of Services and ServiceEntries that were refused (when read,
    /// or here), with the refused resource.
    pub(super) refused: Arc<HashMap<String, String>>,
    /// Hosts of DestinationRules refused when read.
    pub(super) refused_rules: Arc<HashMap<String, String>>,
}

impl Registry {
    /// The refused resource that would have defined `host` (as written, or
    /// qualified in `ns`).
    pub(super) fn refused_for(&self, host: &str, ns: &str) -> Option<&String> {
        self.refused
            .get(host)
            .or_else(|| self.refused.get(&format!("{host}.{ns}.svc.cluster.local")))
    }
}

/// What building a service's endpoints looks up, indexed once per config.
pub(super) struct Index<'a> {
    /// Pods and EndpointSlices: the index node mode reads too.
    kube: KubeIndex<'a>,
    workloads: HashMap<&'a str, Vec<&'a model::WorkloadEntry>>,
    interner: std::cell::RefCell<Interner>,
}

impl<'a> Index<'a> {
    pub(super) fn new(cfg: &'a Config) -> Index<'a> {
        // Workload entries by namespace: one pass instead of one per Service.
        let mut workloads: HashMap<&'a str, Vec<&'a model::WorkloadEntry>> = HashMap::new();
        for we in &cfg.workload_entries {
            workloads
                .entry(we.value.namespace())
                .or_default()
                .push(&we.value);
        }
        Index {
            kube: KubeIndex::new(cfg),
            workloads,
            interner: Default::default(),
        }
    }
}

/// A Kubernetes Service with its endpoints (EndpointSlices, and
/// WorkloadEntries its selector matches).
pub(super) fn service_svc(
    s: &Sourced<model::Service>,
    ix: &Index,
    errors: &mut Vec<ConfigError>,
) -> Svc {
    let obj = &s.value;
    let ns = obj.namespace().to_string();
    // ClientIP affinity: consistent hashing on the source address, as
    // Istio does (a DestinationRule's loadBalancer takes precedence).
    let client_ip_affinity = match session_affinity(&obj.spec) {
        Ok(t) => t.is_some(),
        Err((field, m)) => {
            errors.push(ConfigError::at(&s.origin, obj.id(), field, m));
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
    // Endpoints by the one liveness rule (see `services`).
    let mut live = Live::default();
    for sl in ix.kube.slices(&ns, &obj.metadata.name) {
        let sl = &sl.value;
        let named_ports: BTreeMap<String, u32> = sl
            .ports
            .iter()
            .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port?)))
            .collect();
        let named_ports = ix.interner.borrow_mut().ports(&named_ports);
        for e in &sl.endpoints {
            let state = liveness(e);
            if state == Liveness::Out {
                continue;
            }
            // Subsets select on the labels of the Pod behind the endpoint.
            let pod = ix.kube.pod(&ns, e);
            for a in &e.addresses {
                let labels = ix
                    .interner
                    .borrow_mut()
                    .labels(pod.map_or(&Labels::new(), |p| &p.metadata.labels));
                live.push(
                    state,
                    Ep {
                        address: a.clone(),
                        named_ports: named_ports.clone(),
                        labels,
                        workload: pod
                            .map(|p| p.metadata.name.clone())
                            .or_else(|| e.hostname.clone())
                            .unwrap_or_default(),
                        namespace: ns.clone(),
                        service_account: pod
                            .map(|p| {
                                p.spec
                                    .service_account_name
                                    .clone()
                                    .unwrap_or_else(|| "default".into())
                            })
                            .unwrap_or_default(),
                        locality: slice_locality(
                            pod.map(|p| &p.metadata.labels),
                            e.zone.as_deref(),
                        ),
                    },
                );
            }
        }
    }
    let mut endpoints = live.into_vec();
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
        dns: pb::DnsLookup::None,
        addresses: service_ips(&obj.spec),
        original_dst: false,
    }
}

/// A Service's ClusterIPs (none for headless services).
fn service_ips(spec: &model::ServiceSpec) -> Vec<String> {
    let mut ips: Vec<String> = spec.cluster_ips.clone();
    if let Some(ip) = &spec.cluster_ip
        && !ips.contains(ip)
    {
        ips.push(ip.clone());
    }
    ips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());
    ips
}

/// A ServiceEntry: one service per host.
pub(super) fn service_entry_svcs(
    s: &Sourced<model::ServiceEntry>,
    ix: &Index,
    errors: &mut Vec<ConfigError>,
) -> Vec<Svc> {
    let obj = &s.value;
    let ns = obj.namespace().to_string();
    let mut original_dst = false;
    let dns = match obj.spec.resolution.as_deref() {
        Some("STATIC") => pb::DnsLookup::None,
        Some("DNS") => pb::DnsLookup::Strict,
        Some("DNS_ROUND_ROBIN") => pb::DnsLookup::Logical,
        // Istio's default: to where the client sent it (needs capture).
        None | Some("NONE") => {
            original_dst = true;
            pb::DnsLookup::None
        }
        Some(other) => {
            errors.push(ConfigError::at(
                &s.origin,
                obj.id(),
                "spec.resolution",
                format!("resolution {other}: want NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
            ));
            return Vec::new();
        }
    };
    if original_dst && !obj.spec.endpoints.is_empty() {
        errors.push(ConfigError::at(
            &s.origin,
            obj.id(),
            "spec.endpoints",
            "resolution NONE goes to the original destination: endpoints are not used (Istio refuses them too)".into(),
        ));
        return Vec::new();
    }
    if dns != pb::DnsLookup::None
        && let Some(h) = obj.spec.hosts.iter().find(|h| h.contains('*'))
    {
        errors.push(ConfigError::at(
            &s.origin,
            obj.id(),
            "spec.hosts",
            format!("{h}: a wildcard host cannot be resolved by DNS"),
        ));
        return Vec::new();
    }
    let mut addresses = Vec::new();
    for (i, a) in obj.spec.addresses.iter().enumerate() {
        match a.parse::<std::net::IpAddr>() {
            Ok(ip) => addresses.push(ip.to_string()),
            Err(_) => errors.push(ConfigError::at(
                &s.origin,
                obj.id(),
                &format!("spec.addresses[{i}]"),
                format!("{a:?}: Bosun takes single IP addresses here, not CIDR ranges yet"),
            )),
        }
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
        // DNS without endpoints: the host itself is resolved.
        let endpoints = if original_dst {
            Vec::new()
        } else if dns != pb::DnsLookup::None && endpoints.is_empty() {
            let named_ports = ix.interner.borrow_mut().ports(&BTreeMap::new());
            let labels = ix.interner.borrow_mut().labels(&Labels::new());
            vec![Ep {
                address: h.clone(),
                named_ports,
                labels,
                workload: String::new(),
                namespace: ns.clone(),
                locality: String::new(),
                service_account: String::new(),
            }]
        } else {
            endpoints.clone()
        };
        out.push(Svc {
            host: h.clone(),
            name: h.split('.').next().unwrap_or(h).to_string(),
            namespace: ns.clone(),
            export_to: obj.spec.export_to.clone(),
            ports: ports.clone(),
            endpoints,
            origin: s.origin.clone(),
            id: obj.id(),
            client_ip_affinity: false,
            dns,
            addresses: addresses.clone(),
            original_dst,
        });
    }
    out
}

pub(super) fn build_registry(cfg: &Config, errors: &mut Vec<ConfigError>) -> Registry {
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
    let mut refused = HashMap::new();
    let mut refused_rules = HashMap::new();
    for r in &cfg.refused {
        match r.kind.as_str() {
            "DestinationRule" => {
                let host = resolve_host(&r.host, &r.namespace, &by_host);
                refused_rules.insert(host, r.id.clone());
            }
            _ => {
                refused.insert(r.host.clone(), r.id.clone());
            }
        }
    }
    for s in &cfg.service_entries {
        for h in &s.value.spec.hosts {
            if !by_host.contains_key(h) {
                refused.insert(h.clone(), s.value.id());
            }
        }
    }
    Registry {
        services,
        by_host: Arc::new(by_host),
        refused: Arc::new(refused),
        refused_rules: Arc::new(refused_rules),
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
        locality: w.locality.clone().unwrap_or_default(),
        service_account: w.service_account.clone().unwrap_or_default(),
    }
}

/// An EndpointSlice endpoint's locality: the Pod's `istio-locality` label
/// (`region.zone.subzone`, Istio's override), else `/zone` from the slice
/// (Bosun does not read Nodes, so the region is unknown there).
fn slice_locality(pod_labels: Option<&Labels>, zone: Option<&str>) -> String {
    if let Some(l) = pod_labels.and_then(|l| l.get("istio-locality")) {
        return l.replace('.', "/");
    }
    zone.map(|z| format!("/{z}")).unwrap_or_default()
}
