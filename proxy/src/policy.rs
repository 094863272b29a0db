//! Route policies (Istio's VirtualService resilience fields) in the form the
//! request path applies: timeout, retries, fault injection, mirrors and
//! CORS. Built once per snapshot from `bosun.config.v1`; the decisions that
//! need no I/O (is this retriable, how long to back off, does the fault
//! fire, does the origin match) are pure functions here, tested without
//! sockets.

use std::sync::Arc;
use std::time::Duration;

use bosun_xds_proto::config as pb;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use rand::{Rng, RngExt};

use crate::cluster::Cluster;
use crate::error::{ForwardError, RejectError, reject};
use crate::http::headers::GRPC_STATUS;
use crate::route::StrMatch;

/// Envoy's default retry backoff base; the maximum is 10 × base.
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);

/// What a route does besides picking a cluster.
#[derive(Debug, Default)]
pub struct RoutePolicy {
    /// The whole request, retries included (Envoy's route timeout).
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
    pub cors: Option<Cors>,
}

impl RoutePolicy {
    /// Retries or mirrors need the request body again: it is buffered.
    pub fn replays_body(&self) -> bool {
        self.retry.as_ref().is_some_and(|r| r.attempts > 0) || !self.mirrors.is_empty()
    }
}

/// Envoy's `retry_on` conditions as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn(u16);

/// Every gRPC condition's bit.
const GRPC_ANY: u16 = 0b1_1111 << 8;

impl RetryOn {
    pub const FIVE_XX: RetryOn = RetryOn(1);
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    pub const RESET: RetryOn = RetryOn(1 << 2);
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 3);
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 4);
    pub const RETRIABLE_4XX: RetryOn = RetryOn(1 << 5);
    pub const STATUS_CODES: RetryOn = RetryOn(1 << 6);
    pub const HEADERS: RetryOn = RetryOn(1 << 7);
    pub const GRPC_CANCELLED: RetryOn = RetryOn(1 << 8);
    pub const GRPC_DEADLINE: RetryOn = RetryOn(1 << 9);
    pub const GRPC_INTERNAL: RetryOn = RetryOn(1 << 10);
    pub const GRPC_EXHAUSTED: RetryOn = RetryOn(1 << 11);
    pub const GRPC_UNAVAILABLE: RetryOn = RetryOn(1 << 12);
    /// A reset before any of the request went out (a failed connect).
    pub const RESET_BEFORE_REQUEST: RetryOn = RetryOn(1 << 13);
    /// A response carrying `x-envoy-ratelimited`.
    pub const RATE_LIMITED: RetryOn = RetryOn(1 << 14);

    pub fn parse(name: &str) -> Option<RetryOn> {
        Some(match name {
            "5xx" => Self::FIVE_XX,
            "gateway-error" => Self::GATEWAY_ERROR,
            "reset" => Self::RESET,
            "connect-failure" => Self::CONNECT_FAILURE,
            "refused-stream" => Self::REFUSED_STREAM,
            "retriable-4xx" => Self::RETRIABLE_4XX,
            "retriable-status-codes" => Self::STATUS_CODES,
            "retriable-headers" => Self::HEADERS,
            "cancelled" => Self::GRPC_CANCELLED,
            "deadline-exceeded" => Self::GRPC_DEADLINE,
            "internal" => Self::GRPC_INTERNAL,
            "resource-exhausted" => Self::GRPC_EXHAUSTED,
            "unavailable" => Self::GRPC_UNAVAILABLE,
            "reset-before-request" => Self::RESET_BEFORE_REQUEST,
            "envoy-ratelimited" => Self::RATE_LIMITED,
            _ => return None,
        })
    }

    pub fn has(self, o: RetryOn) -> bool {
        self.0 & o.0 != 0
    }

    fn add(&mut self, o: RetryOn) {
        self.0 |= o.0;
    }
}

#[derive(Debug)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    pub status_codes: Vec<u16>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub avoid_previous_hosts: bool,
    pub remote_localities: bool,
}

/// How one try ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryFailure {
    ConnectFailure,
    /// Reset or closed before the response head (also a refused HTTP/2 stream).
    Reset {
        refused: bool,
    },
    /// The per-try timeout expired.
    Timeout,
    /// Neither: the upstream spoke but not HTTP, or the client went away.
    Other,
}

impl TryFailure {
    pub fn of(e: &ForwardError) -> TryFailure {
        match e {
            ForwardError::Connect(_) => TryFailure::ConnectFailure,
            ForwardError::Reset(_) => TryFailure::Reset { refused: false },
            ForwardError::Hyper(h) if h.is_timeout() => TryFailure::Timeout,
            ForwardError::Hyper(h) if h.is_parse() || h.is_user() => TryFailure::Other,
            ForwardError::Hyper(h) => {
                // h2's REFUSED_STREAM: the upstream did not process the request.
                let refused = std::error::Error::source(h)
                    .and_then(|s| s.downcast_ref::<h2::Error>())
                    .and_then(h2::Error::reason)
                    == Some(h2::Reason::REFUSED_STREAM);
                TryFailure::Reset { refused }
            }
            ForwardError::StreamIdle(_) => TryFailure::Timeout,
            _ => TryFailure::Other,
        }
    }
}

impl RetryPolicy {
    /// Is a failed try (no response) worth another?
    pub fn retriable_failure(&self, f: TryFailure) -> bool {
        let on = self.on;
        let any5 = on.has(RetryOn::FIVE_XX) || on.has(RetryOn::GATEWAY_ERROR);
        match f {
            TryFailure::ConnectFailure => {
                any5 || on.has(RetryOn::CONNECT_FAILURE)
                    || on.has(RetryOn::RESET)
                    || on.has(RetryOn::RESET_BEFORE_REQUEST)
            }
            TryFailure::Reset { refused } => {
                any5 || on.has(RetryOn::RESET) || (refused && on.has(RetryOn::REFUSED_STREAM))
            }
            TryFailure::Timeout => any5 || on.has(RetryOn::RESET),
            TryFailure::Other => false,
        }
    }

    /// Is a response head worth another try? Asked of every response
    /// under a retry policy (Istio gives every route one), so the common
    /// 2xx answer costs a few comparisons. `retriable_headers` are the
    /// names the client listed in `x-envoy-retriable-header-names`.
    pub fn retriable_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        retriable_headers: Option<&HeaderValue>,
    ) -> bool {
        let on = self.on;
        let code = status.as_u16();
        if on.has(RetryOn::FIVE_XX) && status.is_server_error() {
            return true;
        }
        if on.has(RetryOn::GATEWAY_ERROR) && matches!(code, 502..=504) {
            return true;
        }
        if on.has(RetryOn::RETRIABLE_4XX) && code == 409 {
            return true;
        }
        if on.has(RetryOn::RATE_LIMITED) && has_header(headers, &RATELIMITED) {
            return true;
        }
        if on.has(RetryOn::STATUS_CODES) && self.status_codes.contains(&code) {
            return true;
        }
        if on.has(RetryOn::HEADERS)
            && let Some(names) = retriable_headers.and_then(|v| v.to_str().ok())
            && names
                .split(',')
                .map(str::trim)
                .any(|n| !n.is_empty() && headers.contains_key(n))
        {
            return true;
        }
        // gRPC: a trailers-only response carries grpc-status in its head.
        if on.0 & GRPC_ANY == 0 || !has_header(headers, &GRPC_STATUS) {
            return false;
        }
        if let Some(g) = crate::http::body::grpc_status(headers) {
            let want = match g {
                1 => RetryOn::GRPC_CANCELLED,
                4 => RetryOn::GRPC_DEADLINE,
                8 => RetryOn::GRPC_EXHAUSTED,
                13 => RetryOn::GRPC_INTERNAL,
                14 => RetryOn::GRPC_UNAVAILABLE,
                _ => return false,
            };
            return on.has(want);
        }
        false
    }

    /// Envoy's backoff: full jitter, a random wait in
    /// `[0, min(max, base × 2^retry))`, `retry` counting from 0.
    pub fn backoff<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        backoff(self.backoff_base, self.backoff_max, retry, rng)
    }
}

const RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");

/// Whether `h` holds `name`: a small map (a response head's usual size) is
/// scanned, which costs less than hashing the name.
fn has_header(h: &HeaderMap, name: &HeaderName) -> bool {
    if h.keys_len() <= 8 {
        h.keys().any(|k| k == name)
    } else {
        h.contains_key(name)
    }
}

pub fn backoff<R: Rng + ?Sized>(
    base: Duration,
    max: Duration,
    retry: u32,
    rng: &mut R,
) -> Duration {
    let ceiling = base
        .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
        .min(max);
    let ms = ceiling.as_millis() as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rng.random_range(0..ms))
}

#[derive(Debug, Clone)]
pub enum Abort {
    Http(StatusCode),
    Grpc(u32),
}

#[derive(Debug)]
pub struct Fault {
    pub delay: Option<(Duration, u32)>,
    pub abort: Option<(Abort, u32)>,
}

/// Does an event with this share (parts per million) happen this time?
pub fn roll<R: Rng + ?Sized>(per_million: u32, rng: &mut R) -> bool {
    per_million >= 1_000_000 || (per_million > 0 && rng.random_range(0..1_000_000) < per_million)
}

#[derive(Debug)]
pub struct Mirror {
    pub cluster: Arc<Cluster>,
    pub per_million: u32,
}

#[derive(Debug)]
pub struct Cors {
    pub origins: Vec<StrMatch>,
    pub methods: Option<HeaderValue>,
    pub headers: Option<HeaderValue>,
    pub expose: Option<HeaderValue>,
    pub max_age: Option<HeaderValue>,
    pub credentials: bool,
    pub forward_unmatched: bool,
}

impl Cors {
    /// `exact: "*"` allows every origin, as Envoy's CORS filter does.
    pub fn allows(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|m| matches!(m, StrMatch::Exact(e) if e == "*") || m.matches(origin))
    }

    /// The headers of a preflight answer for an allowed origin. `*` in
    /// allowMethods / allowHeaders echoes what the preflight asked for.
    pub fn preflight_headers(
        &self,
        origin: &HeaderValue,
        request_method: Option<&HeaderValue>,
        request_headers: Option<&HeaderValue>,
    ) -> HeaderMap {
        let echo = |v: &HeaderValue, asked: Option<&HeaderValue>| -> HeaderValue {
            match asked {
                Some(a) if v.as_bytes() == b"*" => a.clone(),
                _ => v.clone(),
            }
        };
        let mut h = HeaderMap::new();
        h.insert("access-control-allow-origin", origin.clone());
        if let Some(m) = &self.methods {
            h.insert("access-control-allow-methods", echo(m, request_method));
        }
        if let Some(v) = &self.headers {
            h.insert("access-control-allow-headers", echo(v, request_headers));
        }
        if let Some(v) = &self.max_age {
            h.insert("access-control-max-age", v.clone());
        }
        if self.credentials {
            h.insert(
                "access-control-allow-credentials",
                HeaderValue::from_static("true"),
            );
        }
        h
    }

    /// Headers added to an actual (non-preflight) response for an allowed origin.
    pub fn response_headers(&self, origin: &HeaderValue, h: &mut HeaderMap) {
        h.insert("access-control-allow-origin", origin.clone());
        if self.credentials {
            h.insert(
                "access-control-allow-credentials",
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.expose {
            h.insert("access-control-expose-headers", v.clone());
        }
    }
}

fn ms(v: u64) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(v))
}

fn joined(resource: &str, field: &str, v: &[String]) -> Result<Option<HeaderValue>, RejectError> {
    if v.is_empty() {
        return Ok(None);
    }
    HeaderValue::try_from(v.join(","))
        .map(Some)
        .map_err(|_| reject(resource, field, "not a valid header value"))
}

impl RoutePolicy {
    pub fn build(
        r: &pb::Route,
        resource: &str,
        cluster: &dyn Fn(&str) -> Result<Arc<Cluster>, RejectError>,
        string_match: &dyn Fn(&pb::StringMatch) -> Result<StrMatch, RejectError>,
    ) -> Result<RoutePolicy, RejectError> {
        let mut p = RoutePolicy {
            timeout: ms(r.timeout_ms),
            ..Default::default()
        };
        if let Some(rp) = &r.retry_policy {
            let mut on = RetryOn::default();
            for name in &rp.retry_on {
                on.add(RetryOn::parse(name).ok_or_else(|| {
                    reject(
                        resource,
                        "retry_policy.retry_on",
                        format!("{name:?} is not a retry condition this proxy knows"),
                    )
                })?);
            }
            let base = ms(rp.backoff_base_ms).unwrap_or(BACKOFF_BASE);
            p.retry = Some(RetryPolicy {
                attempts: rp.attempts,
                per_try_timeout: ms(rp.per_try_timeout_ms),
                on,
                status_codes: rp
                    .retriable_status_codes
                    .iter()
                    .map(|c| u16::try_from(*c).unwrap_or(0))
                    .collect(),
                backoff_base: base,
                backoff_max: ms(rp.backoff_max_ms).unwrap_or(base * 10),
                avoid_previous_hosts: rp.avoid_previous_hosts,
                remote_localities: rp.retry_remote_localities,
            });
        }
        if let Some(f) = &r.fault {
            let abort = match (f.abort_http_status, f.abort_grpc_status) {
                (0, None) => None,
                (s, None) => Some(Abort::Http(
                    u16::try_from(s)
                        .ok()
                        .and_then(|s| StatusCode::from_u16(s).ok())
                        .ok_or_else(|| {
                            reject(resource, "fault.abort_http_status", "not an HTTP status")
                        })?,
                )),
                (0, Some(g)) => Some(Abort::Grpc(g)),
                _ => {
                    return Err(reject(
                        resource,
                        "fault",
                        "both an HTTP and a gRPC abort status",
                    ));
                }
            };
            p.fault = Some(Fault {
                delay: ms(f.delay_ms).map(|d| (d, f.delay_per_million)),
                abort: abort.map(|a| (a, f.abort_per_million)),
            });
        }
        for m in &r.mirrors {
            p.mirrors.push(Mirror {
                cluster: cluster(&m.cluster)?,
                per_million: m.per_million,
            });
        }
        if let Some(c) = &r.cors {
            p.cors = Some(Cors {
                origins: c
                    .allow_origins
                    .iter()
                    .map(string_match)
                    .collect::<Result<_, _>>()?,
                methods: joined(resource, "cors.allow_methods", &c.allow_methods)?,
                headers: joined(resource, "cors.allow_headers", &c.allow_headers)?,
                expose: joined(resource, "cors.expose_headers", &c.expose_headers)?,
                max_age: c.max_age_seconds.map(HeaderValue::from),
                credentials: c.allow_credentials,
                forward_unmatched: c.forward_unmatched_preflights,
            });
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn policy(on: &[&str], codes: &[u16]) -> RetryPolicy {
        let mut o = RetryOn::default();
        for n in on {
            o.add(RetryOn::parse(n).expect("known"));
        }
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            on: o,
            status_codes: codes.to_vec(),
            backoff_base: BACKOFF_BASE,
            backoff_max: BACKOFF_BASE * 10,
            avoid_previous_hosts: true,
            remote_localities: false,
        }
    }

    #[test]
    fn retriable_conditions() {
        let none = HeaderMap::new();
        let p = policy(&["gateway-error"], &[]);
        assert!(p.retriable_response(StatusCode::BAD_GATEWAY, &none, None));
        assert!(!p.retriable_response(StatusCode::INTERNAL_SERVER_ERROR, &none, None));
        assert!(p.retriable_failure(TryFailure::ConnectFailure));
        assert!(p.retriable_failure(TryFailure::Timeout));

        let p = policy(&["connect-failure", "retriable-status-codes"], &[503]);
        assert!(p.retriable_response(StatusCode::SERVICE_UNAVAILABLE, &none, None));
        assert!(!p.retriable_response(StatusCode::BAD_GATEWAY, &none, None));
        assert!(p.retriable_failure(TryFailure::ConnectFailure));
        assert!(!p.retriable_failure(TryFailure::Reset { refused: false }));
        assert!(!p.retriable_failure(TryFailure::Timeout));

        let p = policy(&["reset-before-request", "envoy-ratelimited"], &[]);
        assert!(p.retriable_failure(TryFailure::ConnectFailure));
        assert!(!p.retriable_failure(TryFailure::Reset { refused: false }));
        let mut rl = HeaderMap::new();
        rl.insert("x-envoy-ratelimited", HeaderValue::from_static("true"));
        assert!(p.retriable_response(StatusCode::TOO_MANY_REQUESTS, &rl, None));
        assert!(!p.retriable_response(StatusCode::TOO_MANY_REQUESTS, &none, None));

        let p = policy(&["refused-stream"], &[]);
        assert!(p.retriable_failure(TryFailure::Reset { refused: true }));
        assert!(!p.retriable_failure(TryFailure::Reset { refused: false }));

        let p = policy(&["unavailable", "retriable-headers"], &[]);
        let mut g = HeaderMap::new();
        g.insert("grpc-status", HeaderValue::from_static("14"));
        assert!(p.retriable_response(StatusCode::OK, &g, None));
        g.insert("grpc-status", HeaderValue::from_static("13"));
        assert!(!p.retriable_response(StatusCode::OK, &g, None));
        let mut h = HeaderMap::new();
        h.insert("x-try-again", HeaderValue::from_static("1"));
        let names = HeaderValue::from_static("x-other, x-try-again");
        assert!(p.retriable_response(StatusCode::OK, &h, Some(&names)));
        assert!(!p.retriable_response(StatusCode::OK, &h, None));
    }

    #[test]
    fn backoff_is_full_jitter_below_the_cap() {
        let p = policy(&["5xx"], &[]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for retry in 0..8u32 {
            let cap = (25u64 << retry).min(250);
            let mut max_seen = 0;
            for _ in 0..500 {
                let d = p.backoff(retry, &mut rng).as_millis() as u64;
                assert!(d < cap, "retry {retry}: {d} ms >= {cap} ms");
                max_seen = max_seen.max(d);
            }
            // Full jitter spreads over the whole range.
            assert!(max_seen * 10 >= cap * 8, "retry {retry}: max {max_seen}");
        }
    }

    #[test]
    fn a_policy_this_proxy_cannot_apply_is_refused() {
        let no_cluster = |n: &str| -> Result<Arc<Cluster>, RejectError> {
            Err(reject("r", "mirrors", format!("unknown cluster {n:?}")))
        };
        let no_match = |_: &pb::StringMatch| -> Result<StrMatch, RejectError> {
            Ok(StrMatch::Exact(String::new()))
        };
        let route = |rp: pb::RetryPolicy| pb::Route {
            retry_policy: Some(rp),
            ..Default::default()
        };
        let bad = route(pb::RetryPolicy {
            attempts: 1,
            retry_on: vec!["5xx".into(), "when-the-moon-is-full".into()],
            ..Default::default()
        });
        let e = RoutePolicy::build(&bad, "r", &no_cluster, &no_match).expect_err("NACK");
        assert_eq!(e.field, "retry_policy.retry_on");
        assert!(e.message.contains("when-the-moon-is-full"), "{e}");
        let good = route(pb::RetryPolicy {
            attempts: 2,
            retry_on: vec!["gateway-error".into()],
            ..Default::default()
        });
        let p = RoutePolicy::build(&good, "r", &no_cluster, &no_match).expect("valid");
        let r = p.retry.expect("retry");
        assert_eq!(
            (r.backoff_base, r.backoff_max),
            (BACKOFF_BASE, BACKOFF_BASE * 10)
        );
        let mirror = pb::Route {
            mirrors: vec![pb::Mirror {
                cluster: "gone".into(),
                per_million: 1,
            }],
            ..Default::default()
        };
        assert!(RoutePolicy::build(&mirror, "r", &no_cluster, &no_match).is_err());
    }

    #[test]
    fn roll_matches_its_share() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let hits = (0..100_000).filter(|_| roll(250_000, &mut rng)).count();
        assert!((23_500..26_500).contains(&hits), "{hits}");
        assert!(roll(1_000_000, &mut rng));
        assert!(!roll(0, &mut rng));
    }
}
