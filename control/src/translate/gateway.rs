//! Gateway proxies: listeners for the servers of the Gateways that select
//! the proxy, and the VirtualServices bound to them.

use std::collections::BTreeMap;

use bosun_xds_proto::config as pb;

use super::Ctx;
use super::registry::{labels_match, select_protocol};
use crate::error::ConfigError;

/// Does a server host (`host`, `ns/host`, `*`, `*.suffix`) admit this VS host?
fn server_host_admits(server_host: &str, vs_ns: &str, vs_host: &str) -> bool {
    let (ns, h) = server_host.split_once('/').unwrap_or(("*", server_host));
    if ns != "*" && ns != "." && ns != vs_ns {
        return false;
    }
    host_matches(h, vs_host) || host_matches(vs_host, h)
}

pub(super) fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => pattern == host,
    }
}

pub(super) fn gateway(ctx: &mut Ctx<'_>, out: &mut pb::ProxyConfig) {
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
                peer_mtls: 0,
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
            peer_mtls: 0,
        });
        out.route_configurations.push(pb::RouteConfiguration {
            name: rc,
            virtual_hosts: vhosts,
        });
    }
}
