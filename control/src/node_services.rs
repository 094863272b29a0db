//! What node mode programs, read from Services, EndpointSlices, Pods,
//! DestinationRules and VirtualServices: one [`ServicePort`] per
//! (service, port, protocol), with the endpoints a connection may go to.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::error::{ConfigError, ConfigErrors};
use crate::model::{self, Config, IntOrString, Labels};
pub use crate::services::DEFAULT_AFFINITY_TIMEOUT;
use crate::services::{KubeIndex, Live, Liveness, liveness, session_affinity};
use bosun_xds_proto::config as pb;

/// A transport protocol a Service port can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

/// One endpoint a connection to the service port may be sent to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// On this node (`nodeName` equals `--node-name`).
    pub local: bool,
    /// The endpoint's `nodeName` (empty when not set).
    pub node: String,
    /// Relative share of new connections (all equal unless a
    /// VirtualService splits the service across DestinationRule subsets).
    pub weight: u32,
}

/// One port of one Service, as node mode programs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name/protocol/port-name-or-number`: unique, readable, and
    /// the suffix of this service port's chains.
    pub id: String,
    pub proto: Proto,
    pub port: u16,
    pub cluster_ips: Vec<IpAddr>,
    /// `externalIPs` and `loadBalancerIP`: reached like the cluster IP but
    /// following `externalTrafficPolicy`.
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    /// `loadBalancerSourceRanges` (CIDRs), for load-balancer IPs only.
    pub source_ranges: Vec<String>,
    pub node_port: Option<u16>,
    /// `sessionAffinity: ClientIP`: seconds a client sticks to its endpoint.
    pub affinity_timeout: Option<u32>,
    pub external_local: bool,
    pub internal_local: bool,
    /// Sorted; Ready endpoints, or Serving+Terminating ones when none is
    /// ready (as kube-proxy does).
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// Endpoints for traffic under a `Local` policy.
    pub fn local_endpoints(&self) -> Vec<Endpoint> {
        self.endpoints.iter().filter(|e| e.local).cloned().collect()
    }
    /// Endpoints for cluster (internal) traffic.
    pub fn cluster_endpoints(&self) -> Vec<Endpoint> {
        if self.internal_local {
            self.local_endpoints()
        } else {
            self.endpoints.clone()
        }
    }
    /// Endpoints for external traffic (NodePort, external and LB IPs).
    pub fn external_endpoints(&self) -> Vec<Endpoint> {
        if self.external_local {
            self.local_endpoints()
        } else {
            self.endpoints.clone()
        }
    }
    /// Whether external traffic reaches this service port at all.
    pub fn has_external(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
}

/// An address family: node mode writes one table (or iptables flavour) per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    #[default]
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
    /// The nftables family and address expression prefix: `ip` or `ip6`.
    pub fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    /// The nftables address type.
    pub fn addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }
    /// The loopback network, never a NodePort destination.
    pub fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
    /// A host prefix length.
    pub fn host_bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
    /// `addr:port`, bracketed for IPv6.
    pub fn addr_port(ip: &IpAddr, port: u16) -> String {
        std::net::SocketAddr::new(*ip, port).to_string()
    }
}

impl ServicePort {
    /// This service port restricted to one family (a dual-stack Service is
    /// programmed once per family); `None` when it has no address in it.
    pub fn for_family(&self, f: Family) -> Option<ServicePort> {
        let has = |v: &[IpAddr]| v.iter().any(|ip| Family::of(ip) == f);
        if !(has(&self.cluster_ips) || has(&self.external_ips) || has(&self.load_balancer_ips)) {
            return None; // (without copying anything: most services have one family)
        }
        let keep = |v: &[IpAddr]| -> Vec<IpAddr> {
            v.iter().filter(|ip| Family::of(ip) == f).copied().collect()
        };
        let sp = ServicePort {
            id: self.id.clone(),
            proto: self.proto,
            port: self.port,
            cluster_ips: keep(&self.cluster_ips),
            external_ips: keep(&self.external_ips),
            load_balancer_ips: keep(&self.load_balancer_ips),
            source_ranges: self
                .source_ranges
                .iter()
                .filter(|r| parse_cidr(r).is_some_and(|(a, _)| Family::of(&a) == f))
                .cloned()
                .collect(),
            node_port: self.node_port,
            affinity_timeout: self.affinity_timeout,
            external_local: self.external_local,
            internal_local: self.internal_local,
            endpoints: self
                .endpoints
                .iter()
                .filter(|e| Family::of(&e.ip) == f)
                .cloned()
                .collect(),
        };
        let any = !sp.cluster_ips.is_empty()
            || !sp.external_ips.is_empty()
            || !sp.load_balancer_ips.is_empty();
        any.then_some(sp)
    }
}

/// Everything node mode programs, by [`ServicePort::id`].
pub type ServiceMap = BTreeMap<String, std::sync::Arc<ServicePort>>;

fn parse_ip(
    s: &str,
    origin: &model::Origin,
    id: &str,
    field: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<IpAddr> {
    match s.parse::<IpAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(ConfigError::at(
                origin,
                id.to_string(),
                field,
                format!("{s:?} is not an IP address"),
            ));
            None
        }
    }
}

fn port_u16(
    p: u32,
    origin: &model::Origin,
    id: &str,
    field: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<u16> {
    match u16::try_from(p) {
        Ok(v) if v > 0 => Some(v),
        _ => {
            errors.push(ConfigError::at(
                origin,
                id.to_string(),
                field,
                format!("{p} is not a port (1-65535)"),
            ));
            None
        }
    }
}

/// Per-endpoint weights from a VirtualService that splits `host` across
/// DestinationRule subsets: (subset labels, weight) pairs, or `None` when
/// the service is not split.
fn subset_split(cfg: &Config, svc_ns: &str, svc_name: &str) -> Option<Vec<(Labels, u32)>> {
    let fqdn = format!("{svc_name}.{svc_ns}.svc.cluster.local");
    let names_host = |h: &str, ns: &str| {
        h == fqdn || (ns == svc_ns && h == svc_name) || h == format!("{svc_name}.{svc_ns}")
    };
    let vs = cfg.virtual_services.iter().find(|vs| {
        vs.value.spec.gateways.is_empty()
            && vs
                .value
                .spec
                .hosts
                .iter()
                .any(|h| names_host(h, vs.value.namespace()))
    })?;
    let dests: Vec<(&model::Destination, u32)> = if let Some(r) = vs.value.spec.tcp.first() {
        r.route
            .iter()
            .map(|d| (&d.destination, d.weight.unwrap_or(0).max(0) as u32))
            .collect()
    } else if let Some(r) = vs.value.spec.http.first() {
        r.route
            .iter()
            .map(|d| (&d.destination, d.weight.unwrap_or(0).max(0) as u32))
            .collect()
    } else {
        return None;
    };
    if dests.iter().all(|(d, _)| d.subset.is_none()) {
        return None;
    }
    let dr = cfg
        .destination_rules
        .iter()
        .find(|d| names_host(&d.value.spec.host, d.value.namespace()))?;
    let single = dests.len() == 1;
    Some(
        dests
            .iter()
            .filter_map(|(d, w)| {
                let subset = d.subset.as_deref()?;
                let s = dr.value.spec.subsets.iter().find(|s| s.name == subset)?;
                Some((s.labels.clone(), if single { 100 } else { *w }))
            })
            .collect(),
    )
}

/// Reads the service ports node `node_name` programs. Every problem is
/// reported with its file, resource and field; nothing is half-read.
pub fn service_map(cfg: &Config, node_name: &str) -> Result<ServiceMap, ConfigErrors> {
    let mut errors = Vec::new();
    let mut out = ServiceMap::new();
    // Pods, slices and the liveness rule are the proxies' (`services`).
    let ix = KubeIndex::new(cfg);
    for s in &cfg.services {
        let obj = &s.value;
        let spec = &obj.spec;
        let (ns, name, id) = (obj.namespace(), obj.metadata.name.as_str(), obj.id());
        let origin = &s.origin;
        let mut cluster_ips = Vec::new();
        let mut ips: Vec<&String> = spec.cluster_ips.iter().collect();
        if ips.is_empty() {
            ips.extend(spec.cluster_ip.iter());
        }
        for ip in ips {
            if ip == "None" || ip.is_empty() {
                continue; // headless: nothing to program
            }
            if let Some(a) = parse_ip(ip, origin, &id, "spec.clusterIPs", &mut errors) {
                cluster_ips.push(a);
            }
        }
        let external_ips: Vec<IpAddr> = spec
            .external_ips
            .iter()
            .filter_map(|ip| parse_ip(ip, origin, &id, "spec.externalIPs", &mut errors))
            .collect();
        let load_balancer_ips: Vec<IpAddr> = spec
            .load_balancer_ip
            .iter()
            .filter_map(|ip| parse_ip(ip, origin, &id, "spec.loadBalancerIP", &mut errors))
            .collect();
        for r in &spec.load_balancer_source_ranges {
            if parse_cidr(r).is_none() {
                errors.push(ConfigError::at(
                    origin,
                    id.clone(),
                    "spec.loadBalancerSourceRanges",
                    format!("{r:?} is not a CIDR"),
                ));
            }
        }
        let affinity_timeout = match session_affinity(spec) {
            Ok(t) => t,
            Err((field, m)) => {
                errors.push(ConfigError::at(origin, id.clone(), field, m));
                None
            }
        };
        let policy =
            |v: &Option<String>, field: &str, errors: &mut Vec<ConfigError>| match v.as_deref() {
                None | Some("Cluster") => false,
                Some("Local") => true,
                Some(other) => {
                    errors.push(ConfigError::at(
                        origin,
                        id.clone(),
                        field,
                        format!("{other:?}: want Cluster or Local"),
                    ));
                    false
                }
            };
        let external_local = policy(
            &spec.external_traffic_policy,
            "spec.externalTrafficPolicy",
            &mut errors,
        );
        let internal_local = policy(
            &spec.internal_traffic_policy,
            "spec.internalTrafficPolicy",
            &mut errors,
        );
        let split = subset_split(cfg, ns, name);
        for (i, p) in spec.ports.iter().enumerate() {
            let field = |f: &str| format!("spec.ports[{i}].{f}");
            let proto = match p.protocol.as_deref() {
                None | Some("TCP") => Proto::Tcp,
                Some("UDP") => Proto::Udp,
                Some("SCTP") => Proto::Sctp,
                Some(other) => {
                    errors.push(ConfigError::at(
                        origin,
                        id.clone(),
                        &field("protocol"),
                        format!("{other:?}: want TCP, UDP or SCTP"),
                    ));
                    continue;
                }
            };
            let Some(port) = port_u16(p.port, origin, &id, &field("port"), &mut errors) else {
                continue;
            };
            let node_port = match p.node_port {
                Some(np) => match port_u16(np, origin, &id, &field("nodePort"), &mut errors) {
                    Some(v) => Some(v),
                    None => continue,
                },
                None => None,
            };
            let port_name = p.name.clone().unwrap_or_default();
            // Endpoints: every slice of this service, the port of the same name.
            let mut live = Live::default();
            for sl in ix.slices(ns, name) {
                let slice = &sl.value;
                if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
                    continue; // FQDN slices: nothing to program
                }
                let Some(sp) = slice
                    .ports
                    .iter()
                    .find(|sp| sp.name.clone().unwrap_or_default() == port_name)
                else {
                    continue;
                };
                let target = match (sp.port, &p.target_port) {
                    (Some(v), _) => v,
                    (None, Some(IntOrString::Int(v))) => *v,
                    (None, _) => p.port,
                };
                let Some(target) =
                    port_u16(target, &sl.origin, &slice.id(), "ports.port", &mut errors)
                else {
                    continue;
                };
                for (ei, e) in slice.endpoints.iter().enumerate() {
                    let state = liveness(e);
                    if state == Liveness::Out {
                        continue;
                    }
                    let labels = ix.pod_labels(ns, e);
                    for a in &e.addresses {
                        let Some(ip) = parse_ip(
                            a,
                            &sl.origin,
                            &slice.id(),
                            &format!("endpoints[{ei}].addresses"),
                            &mut errors,
                        ) else {
                            continue;
                        };
                        let weight = match &split {
                            None => Some(1),
                            Some(subsets) => subsets
                                .iter()
                                .find(|(sel, _)| {
                                    labels.is_some_and(|l| {
                                        sel.iter().all(|(k, v)| l.get(k) == Some(v))
                                    })
                                })
                                .map(|(_, w)| *w),
                        };
                        let Some(weight) = weight.filter(|w| *w > 0) else {
                            continue; // in no subset the split sends to
                        };
                        let ep = Endpoint {
                            ip,
                            port: target,
                            local: e.node_name.as_deref() == Some(node_name),
                            node: e.node_name.clone().unwrap_or_default(),
                            weight,
                        };
                        live.push(state, ep);
                    }
                }
            }
            let mut endpoints = live.into_vec();
            // A split gives each subset its weight, shared by its endpoints.
            if split.is_some() {
                let mut per_weight: BTreeMap<u32, u32> = BTreeMap::new();
                for e in &endpoints {
                    *per_weight.entry(e.weight).or_default() += 1;
                }
                let lcm = per_weight
                    .values()
                    .fold(1u64, |acc, n| lcm(acc, u64::from(*n)));
                for e in &mut endpoints {
                    let n = u64::from(per_weight[&e.weight]);
                    e.weight = u32::try_from(u64::from(e.weight) * lcm / n).unwrap_or(u32::MAX);
                }
                let g = endpoints
                    .iter()
                    .fold(0u64, |acc, e| gcd(acc, u64::from(e.weight)));
                if g > 1 {
                    for e in &mut endpoints {
                        e.weight = (u64::from(e.weight) / g) as u32;
                    }
                }
            }
            endpoints.sort();
            endpoints.dedup();
            let key = if port_name.is_empty() {
                port.to_string()
            } else {
                port_name.clone()
            };
            let sp_id = format!("{ns}/{name}/{}/{key}", proto.as_str());
            out.insert(
                sp_id.clone(),
                std::sync::Arc::new(ServicePort {
                    id: sp_id,
                    proto,
                    port,
                    cluster_ips: cluster_ips.clone(),
                    external_ips: external_ips.clone(),
                    load_balancer_ips: load_balancer_ips.clone(),
                    source_ranges: spec.load_balancer_source_ranges.clone(),
                    node_port,
                    affinity_timeout,
                    external_local,
                    internal_local,
                    endpoints,
                }),
            );
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// `a.b.c.d/n` or `v6::/n` (a bare address is a host prefix).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, n) = match s.split_once('/') {
        Some((a, n)) => (a, Some(n)),
        None => (s, None),
    };
    let a: IpAddr = a.parse().ok()?;
    let max = if a.is_ipv4() { 32 } else { 128 };
    let n: u8 = match n {
        Some(n) => n.parse().ok()?,
        None => max,
    };
    (n <= max).then_some((a, n))
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: u64, b: u64) -> u64 {
    if a == 0 || b == 0 {
        a.max(b)
    } else {
        a / gcd(a, b) * b
    }
}

/// Node mode over xDS: a service port as a `bosun.config.v1.NodeService`.
pub fn to_proto(sp: &ServicePort) -> pb::NodeService {
    pb::NodeService {
        id: sp.id.clone(),
        protocol: sp.proto.as_str().to_string(),
        port: u32::from(sp.port),
        cluster_ips: sp.cluster_ips.iter().map(|i| i.to_string()).collect(),
        external_ips: sp.external_ips.iter().map(|i| i.to_string()).collect(),
        load_balancer_ips: sp.load_balancer_ips.iter().map(|i| i.to_string()).collect(),
        source_ranges: sp.source_ranges.clone(),
        node_port: sp.node_port.map(u32::from).unwrap_or(0),
        affinity_timeout_seconds: sp.affinity_timeout.unwrap_or(0),
        external_local: sp.external_local,
        internal_local: sp.internal_local,
        endpoints: sp
            .endpoints
            .iter()
            .map(|e| pb::NodeEndpoint {
                address: e.ip.to_string(),
                port: u32::from(e.port),
                node_name: e.node.clone(),
                weight: e.weight,
            })
            .collect(),
    }
}

/// The inverse of [`to_proto`], for node `node_name`: which endpoints are
/// local is decided here, by each node.
pub fn from_proto(m: &pb::NodeService, node_name: &str) -> Result<ServicePort, String> {
    let ip = |s: &String| -> Result<IpAddr, String> {
        s.parse()
            .map_err(|_| format!("{}: bad IP address {s:?}", m.id))
    };
    let port = |p: u32| -> Result<u16, String> {
        u16::try_from(p).map_err(|_| format!("{}: bad port {p}", m.id))
    };
    let proto = match m.protocol.as_str() {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "sctp" => Proto::Sctp,
        other => return Err(format!("{}: unknown protocol {other:?}", m.id)),
    };
    let mut endpoints = Vec::new();
    for e in &m.endpoints {
        endpoints.push(Endpoint {
            ip: ip(&e.address)?,
            port: port(e.port)?,
            local: !e.node_name.is_empty() && e.node_name == node_name,
            node: e.node_name.clone(),
            weight: e.weight.max(1),
        });
    }
    Ok(ServicePort {
        id: m.id.clone(),
        proto,
        port: port(m.port)?,
        cluster_ips: m.cluster_ips.iter().map(ip).collect::<Result<_, _>>()?,
        external_ips: m.external_ips.iter().map(ip).collect::<Result<_, _>>()?,
        load_balancer_ips: m
            .load_balancer_ips
            .iter()
            .map(ip)
            .collect::<Result<_, _>>()?,
        source_ranges: m.source_ranges.clone(),
        node_port: if m.node_port == 0 {
            None
        } else {
            Some(port(m.node_port)?)
        },
        affinity_timeout: (m.affinity_timeout_seconds > 0).then_some(m.affinity_timeout_seconds),
        external_local: m.external_local,
        internal_local: m.internal_local,
        endpoints,
    })
}
