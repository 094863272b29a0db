//! Sidecar proxies: outbound listeners and virtual hosts for the services
//! a proxy may reach (`exportTo`, the `Sidecar` resource), and the inbound
//! listener.

use std::collections::{BTreeMap, BTreeSet};

use bosun_xds_proto::config as pb;

use super::gateway::host_matches;
use super::registry::{PortProtocol, Svc, SvcPort, labels_match, resolve_host};
use super::route::route_all_to;
use super::{Ctx, ProxyParams};
use crate::error::ConfigError;
use crate::model::{self, Config, Sourced};

pub(super) fn sidecar(ctx: &mut Ctx<'_>, out: &mut pb::ProxyConfig) {
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
    let mut cap = CaptureBuilder::default();
    for (si, svc) in reg.services.iter().enumerate() {
        if !scope.admits(&svc.namespace, &svc.host)
            || !exported(&svc.export_to, &svc.namespace, &p.namespace)
        {
            continue;
        }
        let may_clash = clash_scope.admits(&svc.namespace, &svc.host);
        let http_ports: Vec<&SvcPort> = svc.ports.iter().filter(|p| p.protocol.is_http()).collect();
        for sp in &svc.ports {
            if !scope.admits_port(&svc.namespace, &svc.host, Some(sp.number)) {
                continue;
            }
            let vs_idx = vs_for_host.get(&svc.host).copied();
            if p.capture && !sp.protocol.is_http() {
                let routes = default_tcp_routes(ctx, vs_idx, si, svc, sp.number);
                let sni = match (sp.protocol, vs_idx) {
                    (PortProtocol::Tls, Some(i)) => {
                        let vs = &ctx.cfg.virtual_services[i];
                        ctx.tls_routes(vs, "mesh", sp.number, "")
                    }
                    _ => Vec::new(),
                };
                if let Err(m) = cap.add_l4(svc, sp, routes, sni)
                    && may_clash
                {
                    ctx.errors.push(ConfigError::at(
                        &svc.origin,
                        svc.id.clone(),
                        "spec.ports",
                        m,
                    ));
                }
                if sp.protocol != PortProtocol::Unknown {
                    continue;
                }
                // Undeclared: sniffed HTTP routes by Host too (below).
            } else if !sp.protocol.is_http() {
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
                let tcp_routes = default_tcp_routes(ctx, vs_idx, si, svc, sp.number);
                out.listeners.push(pb::Listener {
                    name: format!("outbound_tcp_{}", sp.number),
                    address: p.outbound_address.clone(),
                    port: sp.number,
                    protocol: pb::ListenerProtocol::Tcp as i32,
                    direction: pb::TrafficDirection::Outbound as i32,
                    route_configuration: String::new(),
                    tcp_routes,
                    peer_mtls: 0,
                    tls_servers: vec![],
                    capture: None,
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
            if p.capture {
                // Captured: requests to the ClusterIP by address, and any
                // address on an HTTP port is routed by Host.
                for a in &svc.addresses {
                    let ip = if a.contains(':') {
                        format!("[{a}]")
                    } else {
                        a.clone()
                    };
                    domains.push(format!("{ip}:{}", sp.number));
                    if sp.number == 80 {
                        domains.push(ip);
                    }
                }
                if sp.protocol.is_http() {
                    cap.add_http_port(sp.number);
                }
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
                        m.to_string(),
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
    let capture = p.capture.then(|| {
        // outboundTrafficPolicy: unknown destinations and hosts.
        let passthrough = if scope.registry_only {
            vhosts.push(pb::VirtualHost {
                name: "block_all".into(),
                domains: vec!["*".into()],
                routes: vec![pb::Route {
                    name: "block_all".into(),
                    action: Some(pb::route::Action::DirectResponse(pb::DirectResponse {
                        status: 502,
                        body: Default::default(),
                    })),
                    ..Default::default()
                }],
            });
            String::new()
        } else {
            let name = "PassthroughCluster".to_string();
            ctx.clusters
                .insert(name.clone(), passthrough_cluster(&name, false, &p));
            vhosts.push(pb::VirtualHost {
                name: "allow_any".into(),
                domains: vec!["*".into()],
                routes: vec![route_all_to("allow_any", name.clone())],
            });
            name
        };
        pb::Capture {
            targets: cap.targets(),
            passthrough_cluster: passthrough,
            sniff_timeout_ms: 0,
            inbound: false,
        }
    });
    out.listeners.push(pb::Listener {
        name: "outbound_http".into(),
        address: p.outbound_address.clone(),
        port: p.outbound_port,
        protocol: pb::ListenerProtocol::Http as i32,
        direction: pb::TrafficDirection::Outbound as i32,
        route_configuration: "outbound".into(),
        tcp_routes: vec![],
        peer_mtls: 0,
        tls_servers: vec![],
        capture,
    });
    out.route_configurations.push(pb::RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vhosts,
    });
    if p.capture
        && let Some((addr, port, _)) = p.inbound.clone()
    {
        inbound_captured(ctx, out, &scope, addr, port);
    } else if let Some((addr, port, app_port)) = p.inbound.clone() {
        let cluster = local_app_cluster(ctx, &format!("inbound|{app_port}||"), app_port);
        let mtls = super::security::peer_mtls(ctx.cfg, &p, app_port);
        out.listeners
            .push(inbound_listener("inbound_http", addr, port, mtls, None));
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

/// `exportTo`: empty or `*` is every namespace, `.` the resource's own.
pub(super) fn exported(export_to: &[String], resource_ns: &str, proxy_ns: &str) -> bool {
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
    /// (namespace pattern, host pattern, only this port); None: no
    /// Sidecar applies, or it has no `egress`.
    hosts: Option<Vec<(String, String, Option<u32>)>>,
    /// `outboundTrafficPolicy.mode: REGISTRY_ONLY`.
    registry_only: bool,
    /// `ingress` (captured sidecars): (port, protocol, app port).
    ingress: Vec<(u32, Option<String>, Option<u32>)>,
}

impl EgressScope {
    fn for_proxy(cfg: &Config, p: &ProxyParams) -> EgressScope {
        if p.check_only {
            return EgressScope {
                hosts: None,
                registry_only: false,
                ingress: Vec::new(),
            };
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
        let hosts = selected
            .filter(|s| !s.value.spec.egress.is_empty())
            .map(|s| {
                // `.` is the proxy's own namespace (for a Sidecar in its
                // namespace, the Sidecar's; for the mesh-wide one, still the
                // proxy's, as in Istio).
                let own = p.namespace.clone();
                s.value
                    .spec
                    .egress
                    .iter()
                    .flat_map(|e| {
                        e.hosts
                            .iter()
                            .map(move |h| (h, e.port.as_ref().map(|p| p.number)))
                    })
                    .map(|(h, port)| {
                        let (ns, host) = h.split_once('/').unwrap_or(("*", h.as_str()));
                        let ns = if ns == "." {
                            own.clone()
                        } else {
                            ns.to_string()
                        };
                        (ns, host.to_string(), port)
                    })
                    .collect()
            });
        let registry_only = selected
            .and_then(|s| s.value.spec.outbound_traffic_policy.as_ref())
            .is_some_and(|o| o.mode.as_deref() == Some("REGISTRY_ONLY"));
        let ingress = selected
            .map(|s| {
                s.value
                    .spec
                    .ingress
                    .iter()
                    .map(|i| {
                        let app = i
                            .default_endpoint
                            .as_deref()
                            .and_then(|e| e.rsplit_once(':'))
                            .and_then(|(_, port)| port.parse().ok());
                        (i.port.number, i.port.protocol.clone(), app)
                    })
                    .collect()
            })
            .unwrap_or_default();
        EgressScope {
            hosts,
            registry_only,
            ingress,
        }
    }

    fn admits(&self, ns: &str, host: &str) -> bool {
        self.admits_port(ns, host, None)
    }

    /// `port`: None, any of the host's ports.
    fn admits_port(&self, ns: &str, host: &str, port: Option<u32>) -> bool {
        let Some(hosts) = &self.hosts else {
            return true;
        };
        hosts.iter().any(|(n, h, only)| {
            n != "~"
                && (n == "*" || n == ns)
                && host_matches(h, host)
                && (only.is_none() || port.is_none() || *only == port)
        })
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

/// The L4 route of a service port: its VirtualService's `tcp` routes, else
/// the service's cluster.
fn default_tcp_routes(
    ctx: &mut Ctx<'_>,
    vs_idx: Option<usize>,
    si: usize,
    svc: &Svc,
    port: u32,
) -> Vec<pb::TcpRoute> {
    let mut tcp_routes = Vec::new();
    if let Some(i) = vs_idx {
        let vs = &ctx.cfg.virtual_services[i];
        tcp_routes = ctx.tcp_routes(vs, "mesh", port);
    }
    if tcp_routes.is_empty() {
        match ctx.cluster(si, port, "") {
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
                m.to_string(),
            )),
        }
    }
    tcp_routes
}

/// A sidecar's inbound HTTP listener, routed by the `inbound` routes.
fn inbound_listener(
    name: &str,
    address: String,
    port: u32,
    mtls: pb::PeerMtls,
    capture: Option<pb::Capture>,
) -> pb::Listener {
    pb::Listener {
        name: name.into(),
        address,
        port,
        protocol: pb::ListenerProtocol::Http as i32,
        direction: pb::TrafficDirection::Inbound as i32,
        route_configuration: "inbound".into(),
        tcp_routes: vec![],
        peer_mtls: mtls as i32,
        tls_servers: vec![],
        capture,
    }
}

/// The app on this host at `port`: a one-endpoint cluster named `name`.
fn local_app_cluster(ctx: &mut Ctx<'_>, name: &str, port: u32) -> String {
    let p = ctx.params;
    ctx.clusters.insert(
        name.to_string(),
        pb::Cluster {
            name: name.to_string(),
            protocol: pb::UpstreamProtocol::Unspecified as i32,
            lb_policy: pb::LbPolicy::RoundRobin as i32,
            service_namespace: p.namespace.clone(),
            service_name: p.labels.get("app").cloned().unwrap_or_default(),
            ..Default::default()
        },
    );
    ctx.assignments.insert(
        name.to_string(),
        pb::ClusterLoadAssignment {
            cluster: name.to_string(),
            endpoints: vec![pb::Endpoint {
                address: "127.0.0.1".into(),
                port,
                labels: p.labels.clone().into_iter().collect(),
                namespace: p.namespace.clone(),
                ..Default::default()
            }],
        },
    );
    name.to_string()
}

/// Istio's PassthroughCluster (to the original destination) and
/// InboundPassthroughCluster (to the app, at the dialled port).
fn passthrough_cluster(name: &str, loopback: bool, p: &ProxyParams) -> pb::Cluster {
    pb::Cluster {
        name: name.to_string(),
        protocol: pb::UpstreamProtocol::Unspecified as i32,
        lb_policy: pb::LbPolicy::RoundRobin as i32,
        service_host: if loopback {
            String::new()
        } else {
            name.to_string()
        },
        service_name: if loopback {
            p.labels.get("app").cloned().unwrap_or_default()
        } else {
            name.to_string()
        },
        service_namespace: if loopback {
            p.namespace.clone()
        } else {
            String::new()
        },
        original_dst: !loopback,
        original_dst_loopback: loopback,
        ..Default::default()
    }
}

/// Where captured outbound connections go, by original destination.
#[derive(Default)]
struct CaptureBuilder {
    exact: BTreeMap<(String, u32), pb::CaptureTarget>,
    /// Any address on a port: (target, the service that claimed it).
    any: BTreeMap<u32, (pb::CaptureTarget, String)>,
}

impl CaptureBuilder {
    /// A TCP, TLS or undeclared port: by the service's addresses, its
    /// endpoints' (that endpoint only), and with no address, by port
    /// (TLS: by SNI, shared; others: one service per port).
    fn add_l4(
        &mut self,
        svc: &Svc,
        sp: &SvcPort,
        routes: Vec<pb::TcpRoute>,
        sni: Vec<(Vec<String>, Vec<pb::WeightedCluster>)>,
    ) -> Result<(), String> {
        let protocol = match sp.protocol {
            PortProtocol::Tls => pb::CaptureProtocol::Tls,
            PortProtocol::Unknown => pb::CaptureProtocol::Sniff,
            _ => pb::CaptureProtocol::Tcp,
        };
        let tcp_routes: Vec<pb::TcpRoute> = routes.into_iter().take(1).collect();
        let mut sni_routes: Vec<pb::SniRoute> = sni
            .into_iter()
            .map(|(server_names, clusters)| pb::SniRoute {
                server_names,
                clusters,
            })
            .collect();
        if protocol == pb::CaptureProtocol::Tls
            && let Some(r) = tcp_routes.first()
        {
            sni_routes.push(pb::SniRoute {
                server_names: vec![svc.host.clone()],
                clusters: r.clusters.clone(),
            });
        }
        let target = |address: String, port: u32, pin: bool| pb::CaptureTarget {
            address,
            port,
            protocol: protocol as i32,
            tcp_routes: tcp_routes.clone(),
            sni_routes: sni_routes.clone(),
            pin_endpoint: pin,
            peer_mtls: None,
        };
        for a in &svc.addresses {
            self.exact
                .entry((a.clone(), sp.number))
                .or_insert_with(|| target(a.clone(), sp.number, false));
        }
        for e in &svc.endpoints {
            if e.address.parse::<std::net::IpAddr>().is_err() {
                continue;
            }
            let port = svc.endpoint_port(e, sp);
            // An endpoint of two services: the first keeps it (either
            // reaches the same workload).
            self.exact
                .entry((e.address.clone(), port))
                .or_insert_with(|| target(e.address.clone(), port, true));
        }
        if !svc.addresses.is_empty() {
            return Ok(());
        }
        match self.any.get_mut(&sp.number) {
            None => {
                self.any.insert(
                    sp.number,
                    (target(String::new(), sp.number, false), svc.host.clone()),
                );
                Ok(())
            }
            Some((t, _))
                if t.protocol == protocol as i32 && protocol == pb::CaptureProtocol::Tls =>
            {
                t.sni_routes.extend(sni_routes);
                Ok(())
            }
            Some((t, _)) if t.protocol == pb::CaptureProtocol::Http as i32 => Err(format!(
                "port {} of {} has no address to tell it from the HTTP services on that port (give the ServiceEntry `addresses`, or name the port's protocol)",
                sp.number, svc.host
            )),
            Some((_, owner)) => Err(format!(
                "port {} is also used by {owner}, and neither has an address to tell them apart (give the ServiceEntry `addresses`)",
                sp.number
            )),
        }
    }

    /// HTTP on this port, any address: routed by Host.
    fn add_http_port(&mut self, port: u32) {
        let http = pb::CaptureTarget {
            address: String::new(),
            port,
            protocol: pb::CaptureProtocol::Http as i32,
            ..Default::default()
        };
        // HTTP takes the port from an address-less TLS or TCP service only
        // if none claimed it: that conflict is reported by `add_l4`.
        self.any.entry(port).or_insert((http, String::new()));
    }

    fn targets(self) -> Vec<pb::CaptureTarget> {
        self.exact
            .into_values()
            .chain(self.any.into_values().map(|(t, _)| t))
            .collect()
    }
}

/// A captured sidecar's inbound listener: mTLS as PeerAuthentication says,
/// then to the app on the dialled port (or a Sidecar `ingress` port's
/// `defaultEndpoint`), HTTP or TCP by the workload's Service ports.
fn inbound_captured(
    ctx: &mut Ctx<'_>,
    out: &mut pb::ProxyConfig,
    scope: &EgressScope,
    addr: String,
    port: u32,
) {
    let p = ctx.params.clone();
    let app = "InboundPassthroughCluster".to_string();
    ctx.clusters
        .insert(app.clone(), passthrough_cluster(&app, true, &p));
    // Protocols of the ports the workload serves: its Services' target
    // ports, then the Sidecar's `ingress` (which wins).
    let mut protocols: BTreeMap<u32, PortProtocol> = BTreeMap::new();
    for s in &ctx.cfg.services {
        let v = &s.value;
        if v.namespace() != p.namespace
            || v.spec.selector.is_empty()
            || !labels_match(&v.spec.selector, &p.labels)
        {
            continue;
        }
        for sp in &v.spec.ports {
            let target = match &sp.target_port {
                Some(model::IntOrString::Int(n)) => *n,
                Some(model::IntOrString::String(_)) | None => sp.port,
            };
            if let Ok(proto) =
                super::registry::select_protocol(sp.app_protocol.as_deref(), sp.name.as_deref())
            {
                protocols.entry(target).or_insert(proto);
            }
        }
    }
    let mut routes = Vec::new();
    let mut targets_tcp: BTreeMap<u32, Vec<pb::TcpRoute>> = BTreeMap::new();
    for (number, protocol, app_port) in &scope.ingress {
        if let Ok(proto) = super::registry::select_protocol(protocol.as_deref(), None) {
            protocols.insert(*number, proto);
        }
        let Some(app_port) = app_port.filter(|a| a != number) else {
            continue;
        };
        let cluster = local_app_cluster(ctx, &format!("inbound|{number}||"), app_port);
        let mut r = route_all_to(&format!("inbound|{number}"), cluster.clone());
        r.matches = vec![pb::RouteMatch {
            port: *number,
            ..Default::default()
        }];
        routes.push(r);
        targets_tcp.insert(
            *number,
            vec![pb::TcpRoute {
                clusters: vec![pb::WeightedCluster {
                    cluster,
                    weight: 100,
                }],
            }],
        );
    }
    routes.push(route_all_to("inbound", app.clone()));
    // PeerAuthentication portLevelMtls: a port whose mode differs from the
    // workload's gets its own (sniffed if nothing else declares it).
    let workload_mtls = super::security::peer_mtls(ctx.cfg, &p, 0);
    let pa_ports: Vec<u32> = ctx
        .cfg
        .peer_authentications
        .iter()
        .flat_map(|pa| pa.value.spec.port_level_mtls.keys())
        .filter_map(|k| k.parse().ok())
        .collect();
    let mut port_mtls: BTreeMap<u32, pb::PeerMtls> = BTreeMap::new();
    let known: Vec<u32> = protocols.keys().copied().collect();
    for port in known.into_iter().chain(pa_ports) {
        let m = super::security::peer_mtls(ctx.cfg, &p, port);
        if m != workload_mtls {
            port_mtls.insert(port, m);
            protocols.entry(port).or_insert(PortProtocol::Unknown);
        }
    }
    let targets = protocols
        .iter()
        .map(|(number, proto)| pb::CaptureTarget {
            address: String::new(),
            port: *number,
            protocol: match proto {
                PortProtocol::Http | PortProtocol::Http2 | PortProtocol::Grpc => {
                    pb::CaptureProtocol::Http
                }
                PortProtocol::Tcp | PortProtocol::Tls => pb::CaptureProtocol::Tcp,
                PortProtocol::Unknown => pb::CaptureProtocol::Sniff,
            } as i32,
            tcp_routes: targets_tcp.get(number).cloned().unwrap_or_default(),
            peer_mtls: port_mtls.get(number).map(|m| *m as i32),
            ..Default::default()
        })
        .collect();
    let capture = pb::Capture {
        targets,
        passthrough_cluster: app,
        sniff_timeout_ms: 0,
        inbound: true,
    };
    out.listeners.push(inbound_listener(
        "inbound_capture",
        addr,
        port,
        workload_mtls,
        Some(capture),
    ));
    out.route_configurations.push(pb::RouteConfiguration {
        name: "inbound".into(),
        virtual_hosts: vec![pb::VirtualHost {
            name: "inbound".into(),
            domains: vec!["*".into()],
            routes,
        }],
    });
}
