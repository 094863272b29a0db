//! Checks that need no other resource: duplicate names, weights that do not
//! sum to 100, regexes that do not compile, impossible status codes. Checks
//! across resources (unknown hosts, undefined subsets) happen in translation.

use std::collections::HashMap;

use crate::error::ConfigError;
use crate::model::{self, Config, Origin, StringMatch};

pub fn validate(cfg: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut seen: HashMap<String, Origin> = HashMap::new();
    let mut dup = |id: String, origin: &Origin, errors: &mut Vec<ConfigError>| {
        if let Some(prev) = seen.insert(id.clone(), origin.clone()) {
            errors.push(ConfigError::at(
                origin,
                id,
                "metadata.name",
                format!("duplicate resource (first defined at {prev})"),
            ));
        }
    };
    macro_rules! dups {
        ($($f:ident),*) => {$(
            for r in &cfg.$f { dup(r.value.id(), &r.origin, &mut errors); }
        )*};
    }
    dups!(
        virtual_services,
        destination_rules,
        gateways,
        service_entries,
        workload_entries,
        services,
        endpoint_slices,
        sidecars,
        peer_authentications
    );

    for pa in &cfg.peer_authentications {
        let v = &pa.value;
        let err = |field: String, msg: String| ConfigError::at(&pa.origin, v.id(), &field, msg);
        let mode_ok = |m: &crate::model::PeerMtls| {
            matches!(
                m.mode.as_deref(),
                None | Some("UNSET" | "DISABLE" | "PERMISSIVE" | "STRICT")
            )
        };
        if let Some(m) = &v.spec.mtls
            && !mode_ok(m)
        {
            errors.push(err(
                "spec.mtls.mode".into(),
                format!(
                    "{:?}: want UNSET, DISABLE, PERMISSIVE or STRICT",
                    m.mode.as_deref().unwrap_or("")
                ),
            ));
        }
        if !v.spec.port_level_mtls.is_empty() && v.spec.selector.is_none() {
            errors.push(err(
                "spec.portLevelMtls".into(),
                "needs a selector (Istio applies port-level mTLS to selected workloads only)"
                    .into(),
            ));
        }
        for (port, m) in &v.spec.port_level_mtls {
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                errors.push(err(
                    format!("spec.portLevelMtls.{port}"),
                    "not a port number".into(),
                ));
            }
            if !mode_ok(m) {
                errors.push(err(
                    format!("spec.portLevelMtls.{port}.mode"),
                    format!(
                        "{:?}: want UNSET, DISABLE, PERMISSIVE or STRICT",
                        m.mode.as_deref().unwrap_or("")
                    ),
                ));
            }
        }
    }

    for sc in &cfg.sidecars {
        let v = &sc.value;
        let err = |field: String, msg: String| ConfigError::at(&sc.origin, v.id(), &field, msg);
        let unsupported =
            "not implemented by Bosun: its sidecar listens where `bosun capture` sends traffic";
        for (i, e) in v.spec.egress.iter().enumerate() {
            if e.bind.is_some() {
                errors.push(err(format!("spec.egress[{i}].bind"), unsupported.into()));
            }
            if e.capture_mode.is_some() {
                errors.push(err(
                    format!("spec.egress[{i}].captureMode"),
                    unsupported.into(),
                ));
            }
            if e.hosts.is_empty() {
                errors.push(err(
                    format!("spec.egress[{i}].hosts"),
                    "at least one host is required".into(),
                ));
            }
        }
        for (i, g) in v.spec.ingress.iter().enumerate() {
            if g.bind.is_some() {
                errors.push(err(format!("spec.ingress[{i}].bind"), unsupported.into()));
            }
            if g.capture_mode.is_some() {
                errors.push(err(
                    format!("spec.ingress[{i}].captureMode"),
                    unsupported.into(),
                ));
            }
            if g.tls.is_some() {
                errors.push(err(
                    format!("spec.ingress[{i}].tls"),
                    "not implemented by Bosun (inbound TLS is PeerAuthentication's mutual TLS)"
                        .into(),
                ));
            }
            if g.connection_pool.is_some() {
                errors.push(err(
                    format!("spec.ingress[{i}].connectionPool"),
                    "not implemented by Bosun yet".into(),
                ));
            }
            if let Some(d) = &g.default_endpoint {
                let ok = d.rsplit_once(':').is_some_and(|(h, p)| {
                    matches!(h, "127.0.0.1" | "0.0.0.0" | "[::1]" | "[::]")
                        && p.parse::<u16>().is_ok_and(|p| p > 0)
                });
                if !ok {
                    errors.push(err(
                        format!("spec.ingress[{i}].defaultEndpoint"),
                        format!("{d:?}: want 127.0.0.1:PORT or 0.0.0.0:PORT (unix sockets are not implemented)"),
                    ));
                }
            }
        }
        if let Some(o) = &v.spec.outbound_traffic_policy {
            if !matches!(
                o.mode.as_deref(),
                None | Some("ALLOW_ANY" | "REGISTRY_ONLY")
            ) {
                errors.push(err(
                    "spec.outboundTrafficPolicy.mode".into(),
                    format!(
                        "{:?}: want ALLOW_ANY or REGISTRY_ONLY",
                        o.mode.as_deref().unwrap_or("")
                    ),
                ));
            }
            if o.egress_proxy.is_some() {
                errors.push(err(
                    "spec.outboundTrafficPolicy.egressProxy".into(),
                    "not implemented by Bosun yet".into(),
                ));
            }
        }
    }

    for vs in &cfg.virtual_services {
        let v = &vs.value;
        let err = |field: String, msg: String| ConfigError::at(&vs.origin, v.id(), &field, msg);
        if v.spec.hosts.is_empty() {
            errors.push(err(
                "spec.hosts".into(),
                "at least one host is required".into(),
            ));
        }
        for (i, r) in v.spec.http.iter().enumerate() {
            check_weights(
                r.route.iter().map(|d| d.weight),
                &format!("spec.http[{i}].route"),
                &mut |f, m| errors.push(err(f, m)),
            );
            for (mi, m) in r.matches.iter().enumerate() {
                let base = format!("spec.http[{i}].match[{mi}]");
                let mut all: Vec<(String, &StringMatch)> = Vec::new();
                for (n, sm) in [
                    ("uri", &m.uri),
                    ("authority", &m.authority),
                    ("method", &m.method),
                    ("scheme", &m.scheme),
                ] {
                    if let Some(sm) = sm {
                        all.push((format!("{base}.{n}"), sm));
                    }
                }
                for (k, sm) in m.headers.iter() {
                    all.push((format!("{base}.headers.{k}"), sm));
                }
                for (k, sm) in m.without_headers.iter() {
                    all.push((format!("{base}.withoutHeaders.{k}"), sm));
                }
                for (k, sm) in m.query_params.iter() {
                    all.push((format!("{base}.queryParams.{k}"), sm));
                }
                for (field, sm) in all {
                    if let Some(re) = &sm.regex
                        && let Err(e) = regex::Regex::new(&format!("^(?:{re})$"))
                    {
                        errors.push(err(format!("{field}.regex"), format!("invalid regex: {e}")));
                    }
                }
            }
            if let Some(d) = &r.direct_response
                && !(200..=599).contains(&d.status)
            {
                errors.push(err(
                    format!("spec.http[{i}].directResponse.status"),
                    "must be 200..599".into(),
                ));
            }
            if let Some(red) = &r.redirect
                && let Some(code) = red.redirect_code
                && !matches!(code, 301 | 302 | 303 | 307 | 308)
            {
                errors.push(err(
                    format!("spec.http[{i}].redirect.redirectCode"),
                    "must be 301, 302, 303, 307 or 308".into(),
                ));
            }
        }
        for (i, r) in v.spec.tcp.iter().enumerate() {
            check_weights(
                r.route.iter().map(|d| d.weight),
                &format!("spec.tcp[{i}].route"),
                &mut |f, m| errors.push(err(f, m)),
            );
        }
    }
    for dr in &cfg.destination_rules {
        let spec = &dr.value.spec;
        let policies = spec
            .traffic_policy
            .iter()
            .map(|tp| ("spec.trafficPolicy".to_string(), tp))
            .chain(spec.subsets.iter().enumerate().filter_map(|(i, s)| {
                Some((
                    format!("spec.subsets[{i}].trafficPolicy"),
                    s.traffic_policy.as_ref()?,
                ))
            }));
        for (base, tp) in policies {
            check_policy(
                tp.connection_pool.as_ref(),
                tp.outlier_detection.as_ref(),
                &base,
                &mut |f, m| errors.push(ConfigError::at(&dr.origin, dr.value.id(), &f, m)),
            );
            for (i, p) in tp.port_level_settings.iter().enumerate() {
                check_policy(
                    p.connection_pool.as_ref(),
                    p.outlier_detection.as_ref(),
                    &format!("{base}.portLevelSettings[{i}]"),
                    &mut |f, m| errors.push(ConfigError::at(&dr.origin, dr.value.id(), &f, m)),
                );
            }
        }
        let mut names = HashMap::new();
        for (i, s) in dr.value.spec.subsets.iter().enumerate() {
            // Cluster names are `outbound|port|subset|host`.
            if s.name.is_empty() || s.name.contains('|') {
                errors.push(ConfigError::at(
                    &dr.origin,
                    dr.value.id(),
                    &format!("spec.subsets[{i}].name"),
                    format!("{:?}: a subset needs a name without '|'", s.name),
                ));
            }
            if names.insert(s.name.clone(), i).is_some() {
                errors.push(ConfigError::at(
                    &dr.origin,
                    dr.value.id(),
                    &format!("spec.subsets[{i}].name"),
                    format!("duplicate subset {}", s.name),
                ));
            }
        }
    }
    errors
}

/// `connectionPool` and `outlierDetection` of one traffic policy, checked
/// the way the translation reads them.
fn check_policy(
    cp: Option<&model::ConnectionPoolSettings>,
    od: Option<&model::OutlierDetection>,
    base: &str,
    push: &mut dyn FnMut(String, String),
) {
    use crate::translate::resilience;
    if let Some(Err((f, m))) = cp.map(resilience::connection_pool) {
        push(format!("{base}.{f}"), m);
    }
    if let Some(Err((f, m))) = od.map(resilience::outlier) {
        push(format!("{base}.{f}"), m);
    }
}

fn check_weights(
    weights: impl Iterator<Item = Option<i64>>,
    field: &str,
    push: &mut dyn FnMut(String, String),
) {
    let ws: Vec<Option<i64>> = weights.collect();
    if ws.len() <= 1 && ws.iter().all(|w| w.is_none() || *w == Some(100)) {
        return;
    }
    for (i, w) in ws.iter().enumerate() {
        if w.is_some_and(|w| w < 0) {
            push(
                format!("{field}[{i}].weight"),
                "must not be negative".into(),
            );
            return;
        }
    }
    let sum: i64 = ws.iter().map(|w| w.unwrap_or(0)).sum();
    if sum != 100 {
        push(
            field.to_string(),
            format!("weights sum to {sum}, they must sum to 100"),
        );
    }
}
