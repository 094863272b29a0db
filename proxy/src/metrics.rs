//! Istio standard metrics, rendered in Prometheus text format.
//!
//! Label sets are rendered once per endpoint when a snapshot is built; a
//! request only adds its response code, flags and protocol. The series map
//! is keyed by the label set's pointer, so recording a request hashes a few
//! integers, not ~25 label strings.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::flags::Flags;
use crate::identity::ProxyIdentity;

/// The service a cluster stands for, as the `destination_service*` labels name it.
pub struct ServiceLabels<'a> {
    pub cluster: &'a str,
    pub host: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
}

/// The workload behind an endpoint.
pub struct WorkloadLabels<'a> {
    pub workload: &'a str,
    pub namespace: &'a str,
    pub app: &'a str,
    pub version: &'a str,
}

/// Envoy's default histogram buckets, as Istio's duration metric uses them.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's size buckets: 1 B .. 1 GB, powers of ten.
const SIZE_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// Pre-rendered `reporter`, `source_*` and `destination_*` labels.
#[derive(Debug)]
pub struct LabelSet {
    pub text: String,
    /// Cluster name, for access logs.
    pub cluster: Arc<str>,
    /// Outbound to this endpoint is Istio mutual TLS: the identity its
    /// certificate was verified to carry ("" if the service has several).
    pub mesh_peer: Option<Arc<str>>,
}

/// The principal labels and `connection_security_policy`, as Istio sets
/// them: a request that came in over mutual TLS (reporter destination) names
/// the peer and us, `mutual_tls`; one sent over mutual TLS (reporter source)
/// names us and the identity the upstream's certificate was verified for,
/// with the policy `unknown` (Istio's value for the source side).
fn security_labels(l: &LabelSet, inbound_peer: Option<&str>, own: &str) -> (String, &'static str) {
    let set = |text: String, key: &str, v: &str| {
        if v.is_empty() {
            text
        } else {
            text.replacen(
                &format!("{key}=\"unknown\""),
                &format!("{key}=\"{}\"", esc(v)),
                1,
            )
        }
    };
    match (inbound_peer, &l.mesh_peer) {
        (Some(peer), _) => {
            let t = set(l.text.clone(), "source_principal", peer);
            (set(t, "destination_principal", own), "mutual_tls")
        }
        (None, Some(peer)) => {
            let t = set(l.text.clone(), "source_principal", own);
            (set(t, "destination_principal", peer), "unknown")
        }
        (None, None) => (l.text.clone(), "none"),
    }
}

fn esc(v: &str) -> String {
    if v.is_empty() {
        return "unknown".into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn source_labels(id: &ProxyIdentity, known: bool) -> String {
    let (w, ns, app, ver) = if known {
        (
            id.workload.as_str(),
            id.namespace.as_str(),
            id.app.as_str(),
            id.version.as_str(),
        )
    } else {
        ("", "", "", "")
    };
    format!(
        "source_workload=\"{}\",source_workload_namespace=\"{}\",source_principal=\"unknown\",source_app=\"{}\",source_version=\"{}\",source_canonical_service=\"{}\",source_canonical_revision=\"{}\",source_cluster=\"unknown\"",
        esc(w),
        esc(ns),
        esc(app),
        esc(ver),
        esc(app),
        if ver.is_empty() {
            "latest".into()
        } else {
            esc(ver)
        },
    )
}

#[allow(clippy::too_many_arguments)]
fn dest_labels(
    workload: &str,
    ns: &str,
    app: &str,
    version: &str,
    service: &str,
    service_name: &str,
    service_ns: &str,
) -> String {
    format!(
        "destination_workload=\"{}\",destination_workload_namespace=\"{}\",destination_principal=\"unknown\",destination_app=\"{}\",destination_version=\"{}\",destination_service=\"{}\",destination_service_name=\"{}\",destination_service_namespace=\"{}\",destination_canonical_service=\"{}\",destination_canonical_revision=\"{}\",destination_cluster=\"unknown\"",
        esc(workload),
        esc(ns),
        esc(app),
        esc(version),
        esc(service),
        esc(service_name),
        esc(service_ns),
        esc(if app.is_empty() { service_name } else { app }),
        if version.is_empty() {
            "latest".into()
        } else {
            esc(version)
        },
    )
}

impl LabelSet {
    pub fn unknown() -> LabelSet {
        LabelSet::with(
            "source",
            source_labels(&ProxyIdentity::default(), false),
            dest_labels("", "", "", "", "", "", ""),
            "",
        )
    }

    /// For requests that matched no route (404 NR).
    pub fn no_route(id: &ProxyIdentity, inbound: bool) -> LabelSet {
        let (reporter, src) = if inbound {
            ("destination", source_labels(id, false))
        } else {
            ("source", source_labels(id, true))
        };
        LabelSet::with(reporter, src, dest_labels("", "", "", "", "", "", ""), "")
    }

    fn with(reporter: &str, src: String, dst: String, cluster: &str) -> LabelSet {
        LabelSet {
            text: format!("reporter=\"{reporter}\",{src},{dst}"),
            cluster: Arc::from(cluster),
            mesh_peer: None,
        }
    }

    pub fn destination(
        id: &ProxyIdentity,
        c: &ServiceLabels<'_>,
        e: &WorkloadLabels<'_>,
        inbound: bool,
    ) -> LabelSet {
        if inbound {
            let dst = dest_labels(
                &id.workload,
                &id.namespace,
                &id.app,
                &id.version,
                c.host,
                c.name,
                c.namespace,
            );
            return LabelSet::with("destination", source_labels(id, false), dst, c.cluster);
        }
        let dst = dest_labels(
            e.workload,
            e.namespace,
            e.app,
            e.version,
            c.host,
            c.name,
            c.namespace,
        );
        LabelSet::with("source", source_labels(id, true), dst, c.cluster)
    }

    pub fn destination_service_only(
        id: &ProxyIdentity,
        c: &ServiceLabels<'_>,
        inbound: bool,
    ) -> Arc<LabelSet> {
        let dst = dest_labels("", "", "", "", c.host, c.name, c.namespace);
        let (reporter, src) = if inbound {
            ("destination", source_labels(id, false))
        } else {
            ("source", source_labels(id, true))
        };
        Arc::new(LabelSet::with(reporter, src, dst, c.cluster))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Grpc,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ReqKey {
    labels: usize,
    code: u16,
    flags: Flags,
    protocol: Protocol,
    grpc_status: Option<u16>,
    /// Mutual TLS downstream: the peer's SPIFFE ID (by value: one series
    /// per peer identity, not per connection).
    peer: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
struct Histogram<const N: usize> {
    buckets: [u64; N],
    sum: f64,
    count: u64,
}

impl<const N: usize> Histogram<N> {
    fn new() -> Self {
        Histogram {
            buckets: [0; N],
            sum: 0.0,
            count: 0,
        }
    }
    /// Counts `v` in the first bucket whose bound holds it (one count per
    /// observation; `render` sums them into Prometheus's cumulative `le`
    /// buckets). Beyond the last bound (or NaN) only `count` grows: `+Inf`.
    fn observe(&mut self, bounds: &[f64; N], v: f64) {
        if let Some(i) = bounds.iter().position(|b| v <= *b) {
            self.buckets[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }
    fn merge(&mut self, o: &Self) {
        for i in 0..N {
            self.buckets[i] += o.buckets[i];
        }
        self.sum += o.sum;
        self.count += o.count;
    }
}

#[derive(Debug, Clone)]
struct ReqSeries {
    labels: Arc<LabelSet>,
    requests: u64,
    duration: Histogram<19>,
    request_bytes: Histogram<10>,
    response_bytes: Histogram<10>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TcpKey {
    labels: usize,
    flags: Flags,
}

#[derive(Debug, Clone)]
struct TcpSeries {
    labels: Arc<LabelSet>,
    opened: u64,
    closed: u64,
    sent: u64,
    received: u64,
}

/// One finished HTTP exchange, as metrics see it.
pub struct RequestRecord<'a> {
    pub labels: &'a Arc<LabelSet>,
    pub protocol: Protocol,
    pub code: u16,
    pub flags: Flags,
    pub grpc_status: Option<u16>,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub peer_principal: Option<&'a Arc<str>>,
}

// The series maps hash with FxHash: keys are a label set's address, small
// numbers and a mesh identity the CA signed, few and not chosen by clients.
use crate::fxhash::FxMap;

/// Series are kept per worker (one map each, its lock uncontended: a
/// worker records only into its own) and merged when scraped.
#[derive(Debug)]
pub struct Metrics {
    requests: Vec<Mutex<FxMap<ReqKey, ReqSeries>>>,
    tcp: Vec<Mutex<FxMap<TcpKey, TcpSeries>>>,
    pub config_applied: AtomicU64,
    pub config_rejected: AtomicU64,
    /// DNS endpoint lookups that failed (the last good addresses kept).
    pub dns_failures: AtomicU64,
    pub config_version: Mutex<String>,
    pub downstream_connections: AtomicU64,
    /// Inbound connections refused by PeerAuthentication (plaintext under
    /// STRICT, a failed mutual TLS handshake).
    pub mtls_refused: AtomicU64,
    /// Captured TCP connections to unknown destinations refused under
    /// REGISTRY_ONLY (Istio's BlackHoleCluster).
    pub blackholed: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::per_worker(1)
    }
}

/// This worker's shard of `v`.
fn mine<T>(v: &[T]) -> &T {
    &v[crate::workers::slot(v.len())]
}

impl Metrics {
    /// Metrics whose series are kept per worker (`workers` of them).
    pub fn per_worker(workers: usize) -> Metrics {
        let n = workers.max(1);
        Metrics {
            requests: (0..n).map(|_| Mutex::default()).collect(),
            tcp: (0..n).map(|_| Mutex::default()).collect(),
            config_applied: AtomicU64::new(0),
            config_rejected: AtomicU64::new(0),
            dns_failures: AtomicU64::new(0),
            config_version: Mutex::default(),
            downstream_connections: AtomicU64::new(0),
            mtls_refused: AtomicU64::new(0),
            blackholed: AtomicU64::new(0),
        }
    }

    pub fn record_request(&self, r: RequestRecord<'_>) {
        let key = ReqKey {
            labels: Arc::as_ptr(r.labels) as usize,
            code: r.code,
            flags: r.flags,
            protocol: r.protocol,
            grpc_status: r.grpc_status,
            peer: r.peer_principal.cloned(),
        };
        let mut map = mine(&self.requests)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let s = map.entry(key).or_insert_with(|| ReqSeries {
            labels: r.labels.clone(),
            requests: 0,
            duration: Histogram::new(),
            request_bytes: Histogram::new(),
            response_bytes: Histogram::new(),
        });
        s.requests += 1;
        s.duration.observe(&DURATION_BUCKETS_MS, r.duration_ms);
        s.request_bytes
            .observe(&SIZE_BUCKETS, r.request_bytes as f64);
        s.response_bytes
            .observe(&SIZE_BUCKETS, r.response_bytes as f64);
    }

    fn tcp_series(&self, labels: &Arc<LabelSet>, flags: Flags, f: impl FnOnce(&mut TcpSeries)) {
        let key = TcpKey {
            labels: Arc::as_ptr(labels) as usize,
            flags,
        };
        let mut map = mine(&self.tcp).lock().unwrap_or_else(|p| p.into_inner());
        let s = map.entry(key).or_insert_with(|| TcpSeries {
            labels: labels.clone(),
            opened: 0,
            closed: 0,
            sent: 0,
            received: 0,
        });
        f(s);
    }

    pub fn tcp_opened(&self, labels: &Arc<LabelSet>) {
        self.tcp_series(labels, Flags::None, |s| s.opened += 1);
    }

    /// `sent`: bytes sent to the client; `received`: bytes received from it.
    pub fn tcp_closed(&self, labels: &Arc<LabelSet>, flags: Flags, sent: u64, received: u64) {
        self.tcp_series(labels, flags, |s| {
            s.closed += 1;
            s.sent += sent;
            s.received += received;
        });
    }

    /// `own_principal`: this proxy's SPIFFE ID ("" if it has none).
    pub fn render(&self, own_principal: &str) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Series from old snapshots carry the same label text: merge them.
        let mut reqs: BTreeMap<String, ReqSeries> = BTreeMap::new();
        for shard in &self.requests {
            let map = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (k, s) in map.iter() {
                let proto = match k.protocol {
                    Protocol::Http => "http",
                    Protocol::Grpc => "grpc",
                };
                let grpc = k.grpc_status.map_or("".to_string(), |g| g.to_string());
                let (labels, policy) = security_labels(&s.labels, k.peer.as_deref(), own_principal);
                let text = format!(
                    "{labels},request_protocol=\"{proto}\",response_code=\"{}\",grpc_response_status=\"{grpc}\",response_flags=\"{}\",connection_security_policy=\"{policy}\"",
                    k.code,
                    k.flags.as_str()
                );
                match reqs.get_mut(&text) {
                    Some(e) => {
                        e.requests += s.requests;
                        e.duration.merge(&s.duration);
                        e.request_bytes.merge(&s.request_bytes);
                        e.response_bytes.merge(&s.response_bytes);
                    }
                    None => {
                        reqs.insert(text, s.clone());
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP istio_requests_total Requests, by source, destination and response."
        );
        let _ = writeln!(out, "# TYPE istio_requests_total counter");
        for (l, s) in &reqs {
            let _ = writeln!(out, "istio_requests_total{{{l}}} {}", s.requests);
        }
        histo(
            &mut out,
            "istio_request_duration_milliseconds",
            &reqs,
            &DURATION_BUCKETS_MS,
            |s| &s.duration,
        );
        histo(&mut out, "istio_request_bytes", &reqs, &SIZE_BUCKETS, |s| {
            &s.request_bytes
        });
        histo(
            &mut out,
            "istio_response_bytes",
            &reqs,
            &SIZE_BUCKETS,
            |s| &s.response_bytes,
        );

        let mut tcp: BTreeMap<String, TcpSeries> = BTreeMap::new();
        for shard in &self.tcp {
            let map = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (k, s) in map.iter() {
                let (labels, policy) = security_labels(&s.labels, None, own_principal);
                let text = format!(
                    "{labels},request_protocol=\"tcp\",response_flags=\"{}\",connection_security_policy=\"{policy}\"",
                    k.flags.as_str()
                );
                let e = tcp.entry(text).or_insert_with(|| TcpSeries {
                    labels: s.labels.clone(),
                    opened: 0,
                    closed: 0,
                    sent: 0,
                    received: 0,
                });
                e.opened += s.opened;
                e.closed += s.closed;
                e.sent += s.sent;
                e.received += s.received;
            }
        }
        type Get = fn(&TcpSeries) -> u64;
        let tcp_metrics: [(&str, Get); 4] = [
            ("istio_tcp_connections_opened_total", |s| s.opened),
            ("istio_tcp_connections_closed_total", |s| s.closed),
            ("istio_tcp_sent_bytes_total", |s| s.sent),
            ("istio_tcp_received_bytes_total", |s| s.received),
        ];
        for (name, get) in tcp_metrics {
            let _ = writeln!(out, "# TYPE {name} counter");
            for (l, s) in &tcp {
                let _ = writeln!(out, "{name}{{{l}}} {}", get(s));
            }
        }
        let _ = writeln!(out, "# TYPE bosun_config_applied_total counter");
        let _ = writeln!(
            out,
            "bosun_config_applied_total {}",
            self.config_applied.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP bosun_config_rejected_total Configs refused (invalid); the last good one kept serving."
        );
        let _ = writeln!(out, "# TYPE bosun_config_rejected_total counter");
        let _ = writeln!(
            out,
            "bosun_config_rejected_total {}",
            self.config_rejected.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP bosun_dns_failures_total DNS endpoint lookups that failed; the last good addresses kept serving."
        );
        let _ = writeln!(out, "# TYPE bosun_dns_failures_total counter");
        let _ = writeln!(
            out,
            "bosun_dns_failures_total {}",
            self.dns_failures.load(Ordering::Relaxed)
        );
        let version = self
            .config_version
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let _ = writeln!(out, "# TYPE bosun_config_version_info gauge");
        let _ = writeln!(
            out,
            "bosun_config_version_info{{version=\"{}\"}} 1",
            esc(&version)
        );
        let _ = writeln!(out, "# TYPE bosun_downstream_connections_total counter");
        let _ = writeln!(
            out,
            "bosun_downstream_connections_total {}",
            self.downstream_connections.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP bosun_inbound_mtls_refused_total Inbound connections PeerAuthentication refused (plaintext under STRICT, failed mutual TLS handshakes)."
        );
        let _ = writeln!(out, "# TYPE bosun_inbound_mtls_refused_total counter");
        let _ = writeln!(
            out,
            "bosun_inbound_mtls_refused_total {}",
            self.mtls_refused.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP bosun_blackholed_connections_total Captured TCP connections to unknown destinations refused (outboundTrafficPolicy REGISTRY_ONLY)."
        );
        let _ = writeln!(out, "# TYPE bosun_blackholed_connections_total counter");
        let _ = writeln!(
            out,
            "bosun_blackholed_connections_total {}",
            self.blackholed.load(Ordering::Relaxed)
        );
        out
    }
}

fn histo<const N: usize>(
    out: &mut String,
    name: &str,
    series: &BTreeMap<String, ReqSeries>,
    bounds: &[f64; N],
    get: impl Fn(&ReqSeries) -> &Histogram<N>,
) {
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (l, s) in series {
        let h = get(s);
        let mut le = 0;
        for (b, n) in bounds.iter().zip(h.buckets.iter()) {
            le += n;
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"{b}\"}} {le}");
        }
        let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{{l}}} {}", h.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each observation is counted once; the scrape shows Prometheus's
    /// cumulative buckets (every `le` at or above the value), and values
    /// past the last bound only in `+Inf` and `_count`.
    #[test]
    fn histogram_buckets_render_cumulative() {
        let m = Metrics::default();
        let labels = Arc::new(LabelSet::unknown());
        for (ms, bytes) in [
            (0.2, 0),
            (3.0, 50),
            (3.0, 5_000),
            (9_999_999.0, 2_000_000_000),
        ] {
            m.record_request(RequestRecord {
                labels: &labels,
                protocol: Protocol::Http,
                code: 200,
                flags: Flags::None,
                grpc_status: None,
                duration_ms: ms,
                request_bytes: bytes,
                response_bytes: 0,
                peer_principal: None,
            });
        }
        let out = m.render("");
        let bucket = |name: &str, le: &str| -> u64 {
            let line = out
                .lines()
                .find(|l| {
                    l.starts_with(&format!("{name}_bucket{{"))
                        && l.contains(&format!("le=\"{le}\"}}"))
                })
                .unwrap_or_else(|| panic!("no {name} le={le} in\n{out}"));
            line.rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("count")
        };
        let d = "istio_request_duration_milliseconds";
        assert_eq!(bucket(d, "0.5"), 1);
        assert_eq!(bucket(d, "1"), 1);
        assert_eq!(bucket(d, "5"), 3);
        assert_eq!(bucket(d, "3600000"), 3);
        assert_eq!(bucket(d, "+Inf"), 4);
        let q = "istio_request_bytes";
        assert_eq!(bucket(q, "1"), 1);
        assert_eq!(bucket(q, "100"), 2);
        assert_eq!(bucket(q, "10000"), 3);
        assert_eq!(bucket(q, "1000000000"), 3);
        assert_eq!(bucket(q, "+Inf"), 4);
        assert_eq!(bucket("istio_response_bytes", "1"), 4);
    }
}
