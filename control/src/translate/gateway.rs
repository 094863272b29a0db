//! Gateway proxies: listeners for the servers of the Gateways that select
//! the proxy, and the VirtualServices bound to them.

use std::collections::BTreeMap;

use bosun_xds_proto::config as pb;

use super::Ctx;
use super::registry::{labels_match, select_protocol};
use crate::error::ConfigError;
use crate::model;

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

/// One Gateway server on a port, as the translation needs it.
struct ServerRef<'a> {
    gid: String,
    hosts: Vec<String>,
    tls: Option<&'a model::ServerTlsSettings>,
    /// Where errors about it point.
    origin: &'a model::Origin,
    resource: String,
    field: String,
    namespace: String,
    /// A plaintext server with `httpsRedirect`: every request gets a 301.
    redirect: bool,
}

pub(super) fn gateway(ctx: &mut Ctx<'_>, out: &mut pb::ProxyConfig) {
    let p = ctx.params.clone();
    // (port) -> (HTTP or TCP, bind, servers)
    struct PortServers<'a> {
        tcp: bool,
        bind: String,
        servers: Vec<ServerRef<'a>>,
    }
    let mut ports: BTreeMap<u32, PortServers> = BTreeMap::new();
    let cfg = ctx.cfg;
    for g in &cfg.gateways {
        let gw = &g.value;
        if !labels_match(&gw.spec.selector, &p.labels) {
            continue;
        }
        let gid = format!("{}/{}", gw.namespace(), gw.metadata.name);
        for (i, s) in gw.spec.servers.iter().enumerate() {
            let field = format!("spec.servers[{i}].port.protocol");
            let upper = s.port.protocol.to_ascii_uppercase();
            let is_http = match upper.as_str() {
                "HTTPS" => true,
                "TLS" => false,
                _ => match select_protocol(Some(&s.port.protocol), None) {
                    Ok(pr) => pr.is_http(),
                    Err(m) => {
                        ctx.errors
                            .push(ConfigError::at(&g.origin, gw.id(), &field, m));
                        continue;
                    }
                },
            };
            let tls_field = format!("spec.servers[{i}].tls");
            let needs_tls = matches!(upper.as_str(), "HTTPS" | "TLS");
            let redirect_only = s.tls.as_ref().is_some_and(|t| {
                t.https_redirect == Some(true) && t.mode.is_none() && t.credential_name.is_none()
            });
            if needs_tls && s.tls.is_none() {
                ctx.errors.push(ConfigError::at(
                    &g.origin,
                    gw.id(),
                    &tls_field,
                    format!("protocol {upper} needs tls (mode and a certificate)"),
                ));
                continue;
            }
            if !needs_tls && s.tls.is_some() && !redirect_only {
                ctx.errors.push(ConfigError::at(
                    &g.origin,
                    gw.id(),
                    &tls_field,
                    format!(
                        "protocol {upper} takes no tls settings but httpsRedirect; use HTTPS or TLS"
                    ),
                ));
                continue;
            }
            let bind = s.bind.clone().unwrap_or_else(|| p.gateway_address.clone());
            let entry = ports.entry(s.port.number).or_insert(PortServers {
                tcp: !is_http,
                bind,
                servers: Vec::new(),
            });
            if entry.tcp == is_http {
                ctx.errors.push(ConfigError::at(
                    &g.origin,
                    gw.id(),
                    &field,
                    format!(
                        "port {} is declared both as TCP/TLS and as HTTP/HTTPS",
                        s.port.number
                    ),
                ));
                continue;
            }
            entry.servers.push(ServerRef {
                gid: gid.clone(),
                hosts: s.hosts.clone(),
                tls: if redirect_only { None } else { s.tls.as_ref() },
                origin: &g.origin,
                resource: gw.id(),
                field: tls_field,
                namespace: gw.namespace().to_string(),
                redirect: redirect_only,
            });
        }
    }
    for (port, ps) in ports {
        let tls_on_port = ps.servers.iter().any(|s| s.tls.is_some());
        let plain_on_port = ps.servers.iter().any(|s| s.tls.is_none());
        if tls_on_port && plain_on_port {
            let s = &ps.servers[0];
            ctx.errors.push(ConfigError::at(
                s.origin,
                s.resource.clone(),
                &s.field,
                format!("port {port} has servers with and without TLS; give each its own port"),
            ));
            continue;
        }
        let mut tls_servers = Vec::new();
        for s in &ps.servers {
            let Some(t) = s.tls else { continue };
            match tls_server(ctx, s, t, port, &ps.bind) {
                Ok(mut v) => tls_servers.append(&mut v),
                Err(e) => ctx.errors.push(e),
            }
        }
        if ps.tcp {
            let mut tcp_routes = Vec::new();
            for s in &ps.servers {
                for vs in &ctx.cfg.virtual_services {
                    let ns = vs.value.namespace();
                    let admitted = vs
                        .value
                        .spec
                        .hosts
                        .iter()
                        .any(|h| s.hosts.iter().any(|sh| server_host_admits(sh, ns, h)));
                    if admitted {
                        let r = ctx.tcp_routes(vs, &s.gid, port);
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
                tls_servers,
                capture: None,
            });
            continue;
        }
        let rc = format!("http.{port}");
        let mut vhosts: Vec<pb::VirtualHost> = Vec::new();
        for s in &ps.servers {
            let redirect = s.redirect;
            for vs in &ctx.cfg.virtual_services {
                let ns = vs.value.namespace().to_string();
                let vs_hosts: Vec<String> = vs
                    .value
                    .spec
                    .hosts
                    .iter()
                    .filter(|h| s.hosts.iter().any(|sh| server_host_admits(sh, &ns, h)))
                    .cloned()
                    .collect();
                if vs_hosts.is_empty() {
                    continue;
                }
                let routes = ctx.http_routes(vs, &s.gid, Some(port));
                if routes.is_empty() {
                    continue;
                }
                // httpsRedirect: every request of these hosts gets a 301 to https.
                let routes = if redirect {
                    vec![pb::Route {
                        name: "https-redirect".into(),
                        action: Some(pb::route::Action::Redirect(pb::Redirect {
                            scheme: "https".into(),
                            status: 301,
                            ..Default::default()
                        })),
                        ..Default::default()
                    }]
                } else {
                    routes
                };
                for h in vs_hosts {
                    if let Some(existing) = vhosts.iter_mut().find(|v| v.name == h) {
                        if !redirect {
                            existing.routes.extend(routes.clone());
                        }
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
            tls_servers,
            capture: None,
        });
        out.route_configurations.push(pb::RouteConfiguration {
            name: rc,
            virtual_hosts: vhosts,
        });
    }
}

fn version(v: Option<&str>, field: &str) -> Result<u32, String> {
    match v {
        None | Some("TLS_AUTO") => Ok(0),
        Some("TLSV1_2") => Ok(12),
        Some("TLSV1_3") => Ok(13),
        Some(other @ ("TLSV1_0" | "TLSV1_1")) => Err(format!(
            "{field}: {other} is not offered by rustls (TLS 1.2 and 1.3 only)"
        )),
        Some(other) => Err(format!(
            "{field}: {other:?}: want TLS_AUTO, TLSV1_2 or TLSV1_3"
        )),
    }
}

/// The TLS servers one Gateway server makes: one terminating server for
/// its hosts, or (PASSTHROUGH) one per VirtualService `tls` route.
fn tls_server(
    ctx: &mut Ctx<'_>,
    s: &ServerRef<'_>,
    t: &model::ServerTlsSettings,
    port: u32,
    bind: &str,
) -> Result<Vec<pb::TlsServer>, ConfigError> {
    let err = |field: &str, m: String| ConfigError::at(s.origin, s.resource.clone(), field, m);
    let base = s.field.clone();
    let mode_field = format!("{base}.mode");
    let names: Vec<String> = s
        .hosts
        .iter()
        .map(|h| h.split_once('/').map_or(h.as_str(), |(_, h)| h).to_string())
        .collect();
    let mode = match t.mode.as_deref().unwrap_or("SIMPLE") {
        "SIMPLE" => pb::TlsServerMode::Simple,
        "MUTUAL" => pb::TlsServerMode::Mutual,
        "OPTIONAL_MUTUAL" => pb::TlsServerMode::OptionalMutual,
        "ISTIO_MUTUAL" => pb::TlsServerMode::IstioMutual,
        "PASSTHROUGH" => pb::TlsServerMode::Passthrough,
        "AUTO_PASSTHROUGH" => {
            return Err(err(
                &mode_field,
                "AUTO_PASSTHROUGH (multi-network east-west) is not supported by Bosun".into(),
            ));
        }
        other => return Err(err(&mode_field, format!("unknown mode {other:?}"))),
    };
    if mode == pb::TlsServerMode::Passthrough {
        let mut out = Vec::new();
        for vs in &ctx.cfg.virtual_services {
            let ns = vs.value.namespace().to_string();
            let admitted = vs
                .value
                .spec
                .hosts
                .iter()
                .any(|h| s.hosts.iter().any(|sh| server_host_admits(sh, &ns, h)));
            if !admitted {
                continue;
            }
            for (sni, clusters) in ctx.tls_routes(vs, &s.gid, port, bind) {
                out.push(pb::TlsServer {
                    server_names: sni,
                    mode: mode as i32,
                    passthrough: clusters,
                    ..Default::default()
                });
            }
        }
        return Ok(out);
    }
    let mut ts = pb::TlsServer {
        server_names: names.into_iter().filter(|n| n != "*").collect(),
        mode: mode as i32,
        subject_alt_names: t.subject_alt_names.clone(),
        verify_spki_sha256: t.verify_certificate_spki.clone(),
        verify_cert_sha256: t.verify_certificate_hash.clone(),
        min_version: version(
            t.min_protocol_version.as_deref(),
            &format!("{base}.minProtocolVersion"),
        )
        .map_err(|m| err(&format!("{base}.minProtocolVersion"), m))?,
        max_version: version(
            t.max_protocol_version.as_deref(),
            &format!("{base}.maxProtocolVersion"),
        )
        .map_err(|m| err(&format!("{base}.maxProtocolVersion"), m))?,
        cipher_suites: t.cipher_suites.clone(),
        ..Default::default()
    };
    if mode == pb::TlsServerMode::IstioMutual {
        return Ok(vec![ts]);
    }
    match &t.credential_name {
        Some(name) => {
            let cred =
                super::credentials::credential(ctx.cfg, &s.namespace, name, true).map_err(|e| {
                    match e.secret {
                        Some(sec) => {
                            ConfigError::at(&sec.origin, sec.value.id(), "data", e.message)
                        }
                        None => err(&format!("{base}.credentialName"), e.message),
                    }
                })?;
            ts.certificate_chain = cred.cert;
            ts.private_key = cred.key;
            ts.ca_certificates = cred.ca;
        }
        None => {
            let (Some(cert), Some(key)) = (&t.server_certificate, &t.private_key) else {
                return Err(err(
                    &format!("{base}.credentialName"),
                    "give credentialName, or serverCertificate and privateKey".into(),
                ));
            };
            ts.certificate_file = cert.clone();
            ts.private_key_file = key.clone();
            ts.ca_certificates_file = t.ca_certificates.clone().unwrap_or_default();
        }
    }
    if matches!(
        mode,
        pb::TlsServerMode::Mutual | pb::TlsServerMode::OptionalMutual
    ) && ts.ca_certificates.is_empty()
        && ts.ca_certificates_file.is_empty()
    {
        return Err(err(
            &format!("{base}.caCertificates"),
            format!(
                "{mode:?} needs CA certificates (caCertificates, ca.crt, or a <name>-cacert Secret)"
            ),
        ));
    }
    Ok(vec![ts])
}
