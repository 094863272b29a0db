//! Istio's resilience fields: VirtualService `timeout`, `retries`, `fault`,
//! `mirror(s)` and `corsPolicy`; DestinationRule `connectionPool` and
//! `outlierDetection`. Each becomes its `bosun.config.v1` message with
//! Istio's defaults filled in here, so the proxy applies numbers only.

use bosun_xds_proto::config as pb;

use super::duration::parse_duration_ms;
use super::route::{FieldError, to_string_match};
use crate::model::{self, Percent};

/// Envoy's `retry_on` names Bosun implements.
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "retriable-headers",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
    "reset-before-request",
    "envoy-ratelimited",
];

fn err(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
    (field.into(), msg.into())
}

fn ms(field: &str, s: &str) -> Result<u64, FieldError> {
    parse_duration_ms(s).map_err(|m| err(field, m))
}

/// Istio's percentage (0–100, absent: `absent`) as parts per million.
fn per_million(field: &str, p: &Option<Percent>, absent: f64) -> Result<u32, FieldError> {
    let v = p.as_ref().map_or(absent, |p| p.value);
    if !(0.0..=100.0).contains(&v) || v.is_nan() {
        return Err(err(field, format!("percentage {v} is not within 0..100")));
    }
    Ok((v * 10_000.0).round() as u32)
}

/// Istio's retry policy when a route sets no `retries`: 2 retries on
/// connect-failure, refused-stream, unavailable and cancelled. Since Istio
/// 1.24 `retriable-status-codes` is listed with no codes (a 503 is not
/// retried by default), and so it is here.
pub fn default_retry() -> pb::RetryPolicy {
    pb::RetryPolicy {
        attempts: 2,
        retry_on: [
            "connect-failure",
            "refused-stream",
            "unavailable",
            "cancelled",
            "retriable-status-codes",
        ]
        .map(String::from)
        .to_vec(),
        retriable_status_codes: Vec::new(),
        avoid_previous_hosts: true,
        ..Default::default()
    }
}

/// `retries` → a policy; `None` when `attempts` is 0 (retries off).
pub fn retry(r: &model::HttpRetry) -> Result<Option<pb::RetryPolicy>, FieldError> {
    let attempts = r.attempts.unwrap_or(0);
    if !(0..=100).contains(&attempts) {
        return Err(err(
            "retries.attempts",
            format!("{attempts} is not within 0..100"),
        ));
    }
    if attempts == 0 {
        return Ok(None);
    }
    let mut p = pb::RetryPolicy {
        attempts: attempts as u32,
        avoid_previous_hosts: true,
        retry_remote_localities: r.retry_remote_localities.unwrap_or(false),
        ..Default::default()
    };
    if let Some(t) = &r.per_try_timeout {
        p.per_try_timeout_ms = ms("retries.perTryTimeout", t)?;
    }
    match r.retry_on.as_deref().map(str::trim) {
        None | Some("") => {
            let d = default_retry();
            p.retry_on = d.retry_on;
            p.retriable_status_codes = d.retriable_status_codes;
        }
        Some(list) => {
            for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                if let Ok(code) = item.parse::<u32>() {
                    if !(100..=599).contains(&code) {
                        return Err(err(
                            "retries.retryOn",
                            format!("status code {code} is not within 100..599"),
                        ));
                    }
                    p.retriable_status_codes.push(code);
                } else if RETRY_ON.contains(&item) {
                    if !p.retry_on.iter().any(|x| x == item) {
                        p.retry_on.push(item.to_string());
                    }
                } else {
                    return Err(err(
                        "retries.retryOn",
                        format!(
                            "{item:?} is not a retry condition Bosun knows ({}, or a status code)",
                            RETRY_ON.join(", ")
                        ),
                    ));
                }
            }
            // Istio: a status code in retryOn implies retriable-status-codes.
            if !p.retriable_status_codes.is_empty()
                && !p.retry_on.iter().any(|x| x == "retriable-status-codes")
            {
                p.retry_on.push("retriable-status-codes".into());
            }
        }
    }
    Ok(Some(p))
}

/// gRPC status names (google.rpc.Code) to numbers.
fn grpc_code(name: &str) -> Option<u32> {
    const CODES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    CODES
        .iter()
        .position(|c| *c == name)
        .map(|i| i as u32)
        .or_else(|| name.parse().ok().filter(|n| *n < 17))
}

pub fn fault(f: &model::HttpFaultInjection) -> Result<pb::Fault, FieldError> {
    let mut out = pb::Fault::default();
    if let Some(d) = &f.delay {
        let Some(fixed) = &d.fixed_delay else {
            return Err(err("fault.delay.fixedDelay", "required"));
        };
        out.delay_ms = ms("fault.delay.fixedDelay", fixed)?;
        out.delay_per_million = per_million("fault.delay.percentage.value", &d.percentage, 0.0)?;
    }
    if let Some(a) = &f.abort {
        match (a.http_status, &a.grpc_status) {
            (Some(s), None) => {
                if !(200..=599).contains(&s) {
                    return Err(err(
                        "fault.abort.httpStatus",
                        format!("{s} is not within 200..599"),
                    ));
                }
                out.abort_http_status = s as u32;
            }
            (None, Some(g)) => {
                out.abort_grpc_status = Some(grpc_code(g).ok_or_else(|| {
                    err(
                        "fault.abort.grpcStatus",
                        format!("{g:?} is not a gRPC status name (e.g. UNAVAILABLE)"),
                    )
                })?);
            }
            _ => {
                return Err(err(
                    "fault.abort",
                    "set exactly one of httpStatus or grpcStatus",
                ));
            }
        }
        out.abort_per_million = per_million("fault.abort.percentage.value", &a.percentage, 0.0)?;
    }
    Ok(out)
}

/// A mirror's share: absent is 100% (Istio), unlike a fault's (0%).
pub fn mirror_share(field: &str, p: &Option<Percent>) -> Result<u32, FieldError> {
    per_million(field, p, 100.0)
}

pub fn cors(c: &model::CorsPolicy) -> Result<pb::CorsPolicy, FieldError> {
    let mut out = pb::CorsPolicy {
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        allow_credentials: c.allow_credentials.unwrap_or(false),
        ..Default::default()
    };
    for (i, o) in c.allow_origins.iter().enumerate() {
        let f = format!("corsPolicy.allowOrigins[{i}]");
        match to_string_match(o, &f)? {
            Some(m) => out.allow_origins.push(m),
            None => return Err(err(f, "set one of exact, prefix, regex")),
        }
    }
    if let Some(a) = &c.max_age {
        out.max_age_seconds = Some(ms("corsPolicy.maxAge", a)?.div_ceil(1000));
    }
    out.forward_unmatched_preflights = match c.unmatched_preflights.as_deref() {
        None | Some("FORWARD") | Some("UNSPECIFIED") => true,
        Some("IGNORE") => false,
        Some(o) => {
            return Err(err(
                "corsPolicy.unmatchedPreflights",
                format!("{o:?} is not FORWARD or IGNORE"),
            ));
        }
    };
    Ok(out)
}

fn count(field: &str, v: Option<i64>) -> Result<u32, FieldError> {
    match v {
        None => Ok(0),
        Some(n) if (0..=i64::from(u32::MAX)).contains(&n) => Ok(n as u32),
        Some(n) => Err(err(field, format!("{n} is out of range"))),
    }
}

/// `connectionPool` → limits; 0 means Istio's default (no limit).
pub fn connection_pool(
    cp: &model::ConnectionPoolSettings,
) -> Result<(pb::ConnectionPool, Option<String>), FieldError> {
    let mut out = pb::ConnectionPool::default();
    let mut h2_upgrade = None;
    if let Some(t) = &cp.tcp {
        out.max_connections = count("connectionPool.tcp.maxConnections", t.max_connections)?;
        if let Some(c) = &t.connect_timeout {
            out.connect_timeout_ms = ms("connectionPool.tcp.connectTimeout", c)?;
        }
        if let Some(d) = &t.max_connection_duration {
            out.max_connection_duration_ms = ms("connectionPool.tcp.maxConnectionDuration", d)?;
        }
        if let Some(k) = &t.tcp_keepalive {
            out.tcp_keepalive = Some(pb::TcpKeepalive {
                probes: k.probes.unwrap_or(0),
                time_ms: match &k.time {
                    Some(x) => ms("connectionPool.tcp.tcpKeepalive.time", x)?,
                    None => 0,
                },
                interval_ms: match &k.interval {
                    Some(x) => ms("connectionPool.tcp.tcpKeepalive.interval", x)?,
                    None => 0,
                },
            });
        }
    }
    if let Some(h) = &cp.http {
        out.max_pending_requests = count(
            "connectionPool.http.http1MaxPendingRequests",
            h.http1_max_pending_requests,
        )?;
        out.max_requests = count("connectionPool.http.http2MaxRequests", h.http2_max_requests)?;
        out.max_requests_per_connection = count(
            "connectionPool.http.maxRequestsPerConnection",
            h.max_requests_per_connection,
        )?;
        out.max_retries = count("connectionPool.http.maxRetries", h.max_retries)?;
        if h.max_concurrent_streams.is_some_and(|n| n > 0) {
            return Err(err(
                "connectionPool.http.maxConcurrentStreams",
                "not supported by Bosun yet (an HTTP/2 upstream's own SETTINGS bound its streams)",
            ));
        }
        if let Some(i) = &h.idle_timeout {
            out.idle_timeout_ms = ms("connectionPool.http.idleTimeout", i)?;
        }
        if h.use_client_protocol == Some(true) {
            return Err(err(
                "connectionPool.http.useClientProtocol",
                "not supported by Bosun yet (the upstream protocol follows the port's protocol)",
            ));
        }
        h2_upgrade = match h.h2_upgrade_policy.as_deref() {
            None | Some("DEFAULT") | Some("DO_NOT_UPGRADE") => None,
            Some("UPGRADE") => Some("UPGRADE".to_string()),
            Some(o) => {
                return Err(err(
                    "connectionPool.http.h2UpgradePolicy",
                    format!("{o:?} is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"),
                ));
            }
        };
    }
    Ok((out, h2_upgrade))
}

/// `outlierDetection` with Istio's defaults: 5 consecutive 5xx, 10 s
/// interval, 30 s base ejection, at most 10% ejected, panic disabled.
pub fn outlier(o: &model::OutlierDetection) -> Result<pb::OutlierDetection, FieldError> {
    let pct = |f: &str, v: Option<i64>, d: u32| -> Result<u32, FieldError> {
        match v {
            None => Ok(d),
            Some(n) if (0..=100).contains(&n) => Ok(n as u32),
            Some(n) => Err(err(f, format!("{n} is not within 0..100"))),
        }
    };
    Ok(pb::OutlierDetection {
        consecutive_5xx: match o.consecutive_5xx_errors {
            None => 5,
            v => count("outlierDetection.consecutive5xxErrors", v)?,
        },
        consecutive_gateway_errors: count(
            "outlierDetection.consecutiveGatewayErrors",
            o.consecutive_gateway_errors,
        )?,
        consecutive_local_origin_failures: match o.consecutive_local_origin_failures {
            None => 5,
            v => count("outlierDetection.consecutiveLocalOriginFailures", v)?,
        },
        split_external_local_origin_errors: o.split_external_local_origin_errors.unwrap_or(false),
        interval_ms: match &o.interval {
            Some(i) => ms("outlierDetection.interval", i)?.max(1),
            None => 10_000,
        },
        base_ejection_time_ms: match &o.base_ejection_time {
            Some(i) => ms("outlierDetection.baseEjectionTime", i)?.max(1),
            None => 30_000,
        },
        max_ejection_percent: pct(
            "outlierDetection.maxEjectionPercent",
            o.max_ejection_percent,
            10,
        )?,
        min_health_percent: pct("outlierDetection.minHealthPercent", o.min_health_percent, 0)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_codes_and_names() {
        let r = model::HttpRetry {
            attempts: Some(3),
            per_try_timeout: Some("2s".into()),
            retry_on: Some("gateway-error, 409,reset".into()),
            retry_remote_localities: None,
        };
        let p = retry(&r).expect("valid").expect("enabled");
        assert_eq!(p.attempts, 3);
        assert_eq!(p.per_try_timeout_ms, 2000);
        assert_eq!(p.retriable_status_codes, vec![409]);
        assert_eq!(
            p.retry_on,
            vec!["gateway-error", "reset", "retriable-status-codes"]
        );
        let off = model::HttpRetry {
            attempts: Some(0),
            ..Default::default()
        };
        assert_eq!(retry(&off), Ok(None));
        let bad = model::HttpRetry {
            attempts: Some(1),
            retry_on: Some("5xx,sometimes".into()),
            ..Default::default()
        };
        let e = retry(&bad).expect_err("unknown condition");
        assert_eq!(e.0, "retries.retryOn");
        assert!(e.1.contains("sometimes"), "{}", e.1);
    }

    #[test]
    fn fault_percentages() {
        let f = model::HttpFaultInjection {
            delay: Some(model::FaultDelay {
                fixed_delay: Some("150ms".into()),
                percentage: Some(Percent { value: 12.5 }),
            }),
            abort: Some(model::FaultAbort {
                grpc_status: Some("UNAVAILABLE".into()),
                ..Default::default()
            }),
        };
        let p = fault(&f).expect("valid");
        assert_eq!((p.delay_ms, p.delay_per_million), (150, 125_000));
        assert_eq!(p.abort_grpc_status, Some(14));
        // Istio: no percentage, no fault.
        assert_eq!(p.abort_per_million, 0);
        let both = model::HttpFaultInjection {
            abort: Some(model::FaultAbort {
                http_status: Some(503),
                grpc_status: Some("UNAVAILABLE".into()),
                percentage: None,
            }),
            ..Default::default()
        };
        assert!(fault(&both).is_err());
    }
}
