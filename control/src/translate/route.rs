//! VirtualService routes: HTTP and TCP routes, their matches, header
//! operations and destinations.

use std::collections::BTreeMap;

use bosun_xds_proto::config as pb;

use super::Ctx;
use super::registry::{labels_match, resolve_host};
use crate::error::{ConfigError, RefError};
use crate::model::{self, HttpMatchRequest, Sourced, StringMatch};

impl Ctx<'_> {
    /// Resolves a route destination to a cluster. `listener_port` picks the
    /// service port when the destination names none and the service has several.
    fn destination(
        &mut self,
        d: &model::Destination,
        ns: &str,
        listener_port: Option<u32>,
    ) -> Result<String, RefError> {
        let host = resolve_host(&d.host, ns, &self.reg.by_host);
        let idx = *self.reg.by_host.get(&host).ok_or_else(|| {
            match self.reg.refused_for(&d.host, ns) {
                Some(id) => RefError::RefusedHost {
                    host: d.host.clone(),
                    by: id.clone(),
                },
                None => RefError::UnknownHost(d.host.clone()),
            }
        })?;
        let svc = &self.reg.services[idx];
        let port = match &d.port {
            Some(p) => p.number,
            None if svc.ports.len() == 1 => svc.ports[0].number,
            None => match listener_port.filter(|p| svc.port(*p).is_some()) {
                Some(p) => p,
                None => return Err(RefError::SeveralPorts(host)),
            },
        };
        if svc.port(port).is_none() {
            return Err(RefError::NoPort { host, port });
        }
        self.cluster(idx, port, d.subset.as_deref().unwrap_or(""))
    }

    /// Does a VirtualService apply to this proxy for `gateway` ("mesh" for sidecars)?
    pub(super) fn vs_gateways(vs: &model::VirtualService) -> Vec<String> {
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
    pub(super) fn http_routes(
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
                            m.to_string(),
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
            if matches!(route.action, Some(pb::route::Action::Route(_))) {
                self.route_policies(&mut route, r, vs, &ns, listener_port, &field);
            } else if let Some(name) = policy_field(r) {
                self.errors.push(ConfigError::at(
                    &vs.origin,
                    vs.value.id(),
                    &format!("{field}.{name}"),
                    "applies only to a route with route destinations, not to redirect or directResponse".into(),
                ));
            }
            routes.push(route);
        }
        routes
    }

    pub(super) fn tcp_routes(
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
            let clusters = self.l4_destinations(vs, &r.route, &format!("spec.tcp[{ri}]"), port);
            out.push(pb::TcpRoute { clusters });
        }
        out
    }
}

impl Ctx<'_> {
    /// The weighted clusters of a `tcp` or `tls` route (`at`: the route's
    /// field path); a destination that does not resolve is an error there.
    fn l4_destinations(
        &mut self,
        vs: &Sourced<model::VirtualService>,
        route: &[model::RouteDestination],
        at: &str,
        port: u32,
    ) -> Vec<pb::WeightedCluster> {
        let ns = vs.value.namespace().to_string();
        let mut clusters = Vec::new();
        for (di, d) in route.iter().enumerate() {
            match self.destination(&d.destination, &ns, Some(port)) {
                Ok(c) => clusters.push(pb::WeightedCluster {
                    cluster: c,
                    weight: d.weight.unwrap_or(if route.len() == 1 { 100 } else { 0 }) as u32,
                }),
                Err(m) => self.errors.push(ConfigError::at(
                    &vs.origin,
                    vs.value.id(),
                    &format!("{at}.route[{di}].destination"),
                    m.to_string(),
                )),
            }
        }
        clusters
    }

    /// A VirtualService's `tls` routes that apply to `gateway` on `port`
    /// (bound at `bind`): (SNI hosts, weighted clusters), in order.
    pub(super) fn tls_routes(
        &mut self,
        vs: &Sourced<model::VirtualService>,
        gateway: &str,
        port: u32,
        bind: &str,
    ) -> Vec<(Vec<String>, Vec<pb::WeightedCluster>)> {
        let ns = vs.value.namespace().to_string();
        let vs_gateways = Self::vs_gateways(&vs.value);
        let bind_ip: Option<std::net::IpAddr> = bind.parse().ok();
        let mut out = Vec::new();
        for (ri, r) in vs.value.spec.tls.iter().enumerate() {
            let mut sni: Vec<String> = Vec::new();
            for (mi, m) in r.matches.iter().enumerate() {
                let gws: Vec<String> = if m.gateways.is_empty() {
                    vs_gateways.clone()
                } else {
                    m.gateways.iter().map(|g| qualify_gateway(g, &ns)).collect()
                };
                let mut subnet_ok = m.destination_subnets.is_empty();
                for (si, sub) in m.destination_subnets.iter().enumerate() {
                    match parse_cidr(sub) {
                        Some((net, len)) => {
                            subnet_ok |= bind_ip.is_some_and(|ip| in_cidr(ip, net, len));
                        }
                        None => self.errors.push(ConfigError::at(
                            &vs.origin,
                            vs.value.id(),
                            &format!("spec.tls[{ri}].match[{mi}].destinationSubnets[{si}]"),
                            format!("{sub:?} is not an IP or CIDR"),
                        )),
                    }
                }
                if gws.iter().any(|g| g == gateway)
                    && m.port.is_none_or(|p| p == port)
                    && labels_match(&m.source_labels, &self.params.labels)
                    && subnet_ok
                {
                    sni.extend(m.sni_hosts.iter().cloned());
                }
            }
            if sni.is_empty() {
                continue;
            }
            let clusters = self.l4_destinations(vs, &r.route, &format!("spec.tls[{ri}]"), port);
            out.push((sni, clusters));
        }
        out
    }
}

fn parse_cidr(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse().ok()?, len.parse().ok()?),
        None => {
            let ip: std::net::IpAddr = s.parse().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if matches!(ip, std::net::IpAddr::V4(_)) {
        32
    } else {
        128
    };
    (len <= max).then_some((ip, len))
}

fn in_cidr(ip: std::net::IpAddr, net: std::net::IpAddr, len: u8) -> bool {
    match (ip, net) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// The first resilience field a route sets, for refusing it where it cannot apply.
fn policy_field(r: &model::HttpRoute) -> Option<&'static str> {
    [
        (r.timeout.is_some(), "timeout"),
        (r.retries.is_some(), "retries"),
        (r.fault.is_some(), "fault"),
        (r.mirror.is_some() || !r.mirrors.is_empty(), "mirror"),
        (r.cors_policy.is_some(), "corsPolicy"),
    ]
    .into_iter()
    .find(|(set, _)| *set)
    .map(|(_, n)| n)
}

impl Ctx<'_> {
    /// Timeout, retries (Istio's default policy when absent), fault,
    /// mirrors and CORS of one route; each bad field is reported.
    fn route_policies(
        &mut self,
        route: &mut pb::Route,
        r: &model::HttpRoute,
        vs: &Sourced<model::VirtualService>,
        ns: &str,
        listener_port: Option<u32>,
        field: &str,
    ) {
        use super::resilience;
        let mut errs: Vec<FieldError> = Vec::new();
        if let Some(t) = &r.timeout {
            match super::duration::parse_duration_ms(t) {
                Ok(ms) => route.timeout_ms = ms,
                Err(m) => errs.push(("timeout".into(), m)),
            }
        }
        route.retry_policy = match &r.retries {
            None => Some(resilience::default_retry()),
            Some(rt) => resilience::retry(rt).unwrap_or_else(|e| {
                errs.push(e);
                None
            }),
        };
        if let Some(f) = &r.fault {
            match resilience::fault(f) {
                Ok(f) => route.fault = Some(f),
                Err(e) => errs.push(e),
            }
        }
        let mut mirrors: Vec<(String, &model::Destination, &Option<model::Percent>)> = Vec::new();
        if let Some(m) = &r.mirror {
            mirrors.push(("mirror".into(), m, &r.mirror_percentage));
        } else if r.mirror_percentage.is_some() {
            errs.push(("mirrorPercentage".into(), "set without mirror".into()));
        }
        for (i, m) in r.mirrors.iter().enumerate() {
            mirrors.push((
                format!("mirrors[{i}].destination"),
                &m.destination,
                &m.percentage,
            ));
        }
        if r.mirror.is_some() && !r.mirrors.is_empty() {
            errs.push(("mirrors".into(), "set mirror or mirrors, not both".into()));
        }
        for (f, d, pct) in mirrors {
            let share = resilience::mirror_share(&format!("{f}.percentage"), pct);
            match (self.destination(d, ns, listener_port), share) {
                (Ok(cluster), Ok(per_million)) => route.mirrors.push(pb::Mirror {
                    cluster,
                    per_million,
                }),
                (Err(m), _) => errs.push((f, m.to_string())),
                (_, Err(e)) => errs.push(e),
            }
        }
        if let Some(c) = &r.cors_policy {
            match resilience::cors(c) {
                Ok(c) => route.cors = Some(c),
                Err(e) => errs.push(e),
            }
        }
        for (f, m) in errs {
            self.errors.push(ConfigError::at(
                &vs.origin,
                vs.value.id(),
                &format!("{field}.{f}"),
                m,
            ));
        }
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

pub(super) type FieldError = (String, String);

pub(super) fn to_string_match(
    m: &StringMatch,
    field: &str,
) -> Result<Option<pb::StringMatch>, FieldError> {
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
                if k.starts_with("@request.auth.claims") {
                    return Err((
                        format!("{f}.{k}"),
                        "matching on JWT claims needs RequestAuthentication, which Bosun does not implement yet".into(),
                    ));
                }
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

/// A route that sends every request to one cluster.
pub(super) fn route_all_to(name: &str, cluster: String) -> pb::Route {
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
        ..Default::default()
    }
}
