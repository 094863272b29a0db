//! Sidecar proxies: outbound listeners and virtual hosts for the services
//! a proxy may reach (`exportTo`, the `Sidecar` resource), and the inbound
//! listener.

use std::collections::{BTreeMap, BTreeSet};

use bosun_xds_proto::config as pb;

use super::gateway::host_matches;
use super::registry::{Svc, SvcPort, labels_match, resolve_host};
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
                            m.to_string(),
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
                    peer_mtls: 0,
                    tls_servers: vec![],
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
    });
    out.route_configurations.push(pb::RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vhosts,
    });
    if let Some((addr, port, app_port)) = p.inbound.clone() {
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
                    locality: String::new(),
                    istio_mtls: false,
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
            peer_mtls: super::security::peer_mtls(ctx.cfg, &p, app_port) as i32,
            tls_servers: vec![],
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
