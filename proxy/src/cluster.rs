//! Clusters, endpoints and load balancing.
//!
//! Per-endpoint state (in-flight requests, for LEAST_REQUEST) lives in an
//! [`EndpointRegistry`] keyed by address, so it survives config swaps: a new
//! snapshot sees the requests the old one still has in flight.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use http::HeaderName;
use http::uri::Authority;
use rand::RngExt;

use crate::error::RejectError;
use crate::metrics::LabelSet;
use crate::outlier::{Outcome, OutlierConfig, OutlierState, may_eject};
use crate::pool::Pool;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    Tcp,
    /// Same as the downstream request (inbound listeners).
    Downstream,
}

/// Live per-endpoint state: in-flight requests (LEAST_REQUEST) and the
/// outlier detector. Connections live in [`Pool`]s, not here.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub active: AtomicUsize,
    pub outlier: OutlierState,
}

/// Live per-cluster state: the circuit breakers' counts and the clock
/// outlier detection runs on.
#[derive(Debug)]
pub struct ClusterState {
    epoch: tokio::time::Instant,
    pub active_requests: AtomicUsize,
    pub pending: AtomicUsize,
    pub active_retries: AtomicUsize,
    /// The latest `ejected_until` of any endpoint: before it, pick filters.
    ejected_until_max: AtomicU64,
    /// HTTP/1.1 connection slots (`maxConnections`), with the limit they were made for.
    conn_slots: Mutex<Option<(u32, Arc<tokio::sync::Semaphore>)>>,
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState {
            epoch: tokio::time::Instant::now(),
            active_requests: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            active_retries: AtomicUsize::new(0),
            ejected_until_max: AtomicU64::new(0),
            conn_slots: Mutex::new(None),
        }
    }
}

impl ClusterState {
    /// Milliseconds since the state was made, on tokio's clock; never 0.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The semaphore for `limit` HTTP/1.1 connections (kept across config
    /// swaps while the limit stays the same).
    pub fn conn_slots(&self, limit: u32) -> Arc<tokio::sync::Semaphore> {
        let mut slot = self.conn_slots.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some((l, s)) if *l == limit => s.clone(),
            _ => {
                let s = Arc::new(tokio::sync::Semaphore::new(limit as usize));
                *slot = Some((limit, s.clone()));
                s
            }
        }
    }
}

/// Endpoint and cluster state by cluster name (and endpoint address),
/// shared by all snapshots: a new snapshot sees the requests the old one
/// still has in flight, and the endpoints it ejected.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    stats: Mutex<HashMap<(String, SocketAddr), Weak<EndpointStats>>>,
    clusters: Mutex<HashMap<String, Weak<ClusterState>>>,
}

impl EndpointRegistry {
    pub fn stats(&self, cluster: &str, addr: SocketAddr) -> Arc<EndpointStats> {
        let mut map = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let key = (cluster.to_string(), addr);
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let s = Arc::new(EndpointStats::default());
        map.insert(key, Arc::downgrade(&s));
        s
    }

    pub fn cluster(&self, name: &str) -> Arc<ClusterState> {
        let mut map = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(name).and_then(Weak::upgrade) {
            return s;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let s = Arc::new(ClusterState::default());
        map.insert(name.to_string(), Arc::downgrade(&s));
        s
    }
}

/// DestinationRule `connectionPool` limits; 0 is no limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct CircuitLimits {
    pub max_connections: u32,
    pub max_pending: u32,
    pub max_requests: u32,
    /// 0: the retry budget (20% of active requests, at least 3).
    pub max_retries: u32,
}

/// Endpoints of one locality priority, in groups with `distribute` weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub weight: u32,
    pub members: Vec<u32>,
}

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub authority: Authority,
    /// "127.0.0.1:8080" for access logs.
    pub addr_str: Arc<str>,
    pub stats: Arc<EndpointStats>,
    /// Connections to this endpoint with this cluster's transport.
    pub pool: Arc<Pool>,
    pub labels: Arc<LabelSet>,
}

impl Endpoint {
    pub fn new(
        addr: SocketAddr,
        stats: Arc<EndpointStats>,
        pool: Arc<Pool>,
        labels: LabelSet,
    ) -> Result<Self, RejectError> {
        let s = addr.to_string();
        let authority = Authority::try_from(s.as_str()).map_err(|e| RejectError {
            resource: format!("Endpoint/{s}"),
            field: "address".into(),
            message: e.to_string(),
        })?;
        Ok(Endpoint {
            addr,
            authority,
            addr_str: Arc::from(s.as_str()),
            stats,
            pool,
            labels: Arc::new(labels),
        })
    }
}

#[derive(Debug, Clone)]
pub enum HashKey {
    Header(HeaderName),
    Cookie {
        name: String,
        path: String,
        ttl_seconds: u64,
    },
    SourceIp,
    Query(String),
}

#[derive(Debug)]
pub enum Lb {
    RoundRobin(AtomicUsize),
    LeastRequest,
    Random,
    /// Sorted (hash, endpoint index) points on the ring.
    RingHash(Vec<(u64, u32)>),
    /// Maglev lookup table: slot → endpoint index.
    Maglev(Vec<u32>),
}

pub fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

const DEFAULT_RING: u64 = 1024;
const MAX_RING: u64 = 8 * 1024 * 1024;
const DEFAULT_MAGLEV: u64 = 65537;

impl Lb {
    pub fn round_robin() -> Lb {
        // Start at a random offset so that many proxies do not move in lockstep.
        Lb::RoundRobin(AtomicUsize::new(rand::rng().random_range(0..1024)))
    }

    pub fn is_hash(&self) -> bool {
        matches!(self, Lb::RingHash(_) | Lb::Maglev(_))
    }

    /// Ketama-style ring: each endpoint hashed onto the ring `minimumRingSize/8`
    /// (at least 64) times, keyed by its address so that order in the config does not matter.
    pub fn ring_hash(endpoints: &[Arc<Endpoint>], min_size: u64) -> Lb {
        if endpoints.is_empty() {
            return Lb::RingHash(Vec::new());
        }
        // Points per endpoint depend only on the configured size, not on the
        // number of endpoints, so removing one endpoint moves only its keys.
        let size = if min_size == 0 {
            DEFAULT_RING
        } else {
            min_size.min(MAX_RING)
        };
        // The whole ring stays within MAX_RING points (Envoy's
        // maximum_ring_size): a config with a huge size and many endpoints
        // must not take the proxy's memory.
        let per = (size / 8)
            .max(64)
            .min(MAX_RING / endpoints.len() as u64)
            .max(1);
        let mut ring = Vec::with_capacity((per as usize) * endpoints.len());
        for (i, e) in endpoints.iter().enumerate() {
            for r in 0..per {
                let key = format!("{}_{r}", e.addr);
                ring.push((hash_bytes(key.as_bytes()), i as u32));
            }
        }
        ring.sort_unstable();
        Lb::RingHash(ring)
    }

    /// Maglev (Eisenbud et al., NSDI '16): each endpoint fills the table in
    /// its own permutation order; removal moves few keys.
    pub fn maglev(endpoints: &[Arc<Endpoint>], table_size: u64) -> Result<Lb, String> {
        let m = if table_size == 0 {
            DEFAULT_MAGLEV
        } else {
            table_size
        };
        if !(3..=5_000_011).contains(&m) || !is_prime(m) {
            return Err(format!(
                "maglev table size {m} must be a prime between 3 and 5000011"
            ));
        }
        let n = endpoints.len();
        if n == 0 {
            return Ok(Lb::Maglev(Vec::new()));
        }
        let perms: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| {
                let name = e.addr.to_string();
                let offset = hash_bytes(name.as_bytes()) % m;
                let skip = hash_bytes(format!("{name}#skip").as_bytes()) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        'outer: loop {
            for i in 0..n {
                let (offset, skip) = perms[i];
                let mut c = (offset + next[i] * skip) % m;
                while table[c as usize] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                table[c as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'outer;
                }
            }
        }
        Ok(Lb::Maglev(table))
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub protocol: UpstreamProtocol,
    pub lb: Lb,
    pub hash: Option<HashKey>,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Metric labels when no endpoint could be picked (503 UH).
    pub no_endpoint_labels: Arc<LabelSet>,
    pub state: Arc<ClusterState>,
    pub limits: CircuitLimits,
    /// `maxConnections` slots (HTTP/1.1 requests, TCP connections).
    pub conn_slots: Option<Arc<tokio::sync::Semaphore>>,
    pub outlier: Option<OutlierConfig>,
    /// Locality priorities, lowest first; empty: every endpoint in one.
    pub priorities: Vec<Vec<Group>>,
    /// Istio's ORIGINAL_DST: no endpoints of its own; each connection's
    /// original destination becomes one (see `capture`).
    pub original_dst: Option<Box<OriginalDst>>,
}

/// What an ORIGINAL_DST cluster builds its per-destination clusters from.
#[derive(Debug)]
pub struct OriginalDst {
    /// The cluster's config, without the original-destination flags.
    pub source: bosun_xds_proto::config::Cluster,
    /// To the app on this host (127.0.0.1 or ::1) at the dialled port.
    pub loopback: bool,
    /// Clusters built so far, by destination; this snapshot's only (a new
    /// snapshot starts empty), and bounded.
    pub built: std::sync::Mutex<std::collections::HashMap<SocketAddr, Arc<Cluster>>>,
}

impl Cluster {
    /// Picks an endpoint index. `key` is the request's hash key for hash
    /// policies (a missing key falls back to a random pick, as Envoy does);
    /// `tried` are endpoints earlier tries used, avoided while others are
    /// left. Ejected endpoints and lower locality priorities are honoured.
    pub fn pick(&self, key: Option<u64>, tried: &[usize]) -> Option<usize> {
        self.pick_retry(key, tried, false)
    }

    /// As [`Cluster::pick`]; `remote`: a retry that has tried every
    /// endpoint of its locality priority may go to the next one
    /// (`retryRemoteLocalities`). Without it, as in Envoy, it stays.
    pub fn pick_retry(&self, key: Option<u64>, tried: &[usize], remote: bool) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let ejections = self.outlier.is_some()
            && self.state.ejected_until_max.load(Ordering::Relaxed) > self.state.now_ms();
        if tried.is_empty() && self.priorities.is_empty() && !ejections {
            return Some(if n == 1 { 0 } else { self.choose(key, None) });
        }
        let now = if ejections { self.state.now_ms() } else { 0 };
        let healthy = |i: usize| !ejections || !self.endpoints[i].stats.outlier.is_ejected(now);
        // Envoy's panic mode: below minHealthPercent healthy, ejections are ignored.
        let panic = match &self.outlier {
            Some(o) if ejections && o.min_health_percent > 0 => {
                let h = (0..n).filter(|i| healthy(*i)).count();
                h * 100 < n * o.min_health_percent as usize
            }
            _ => false,
        };
        let all;
        let levels: &[Vec<Group>] = if self.priorities.is_empty() {
            all = [vec![Group {
                weight: 1,
                members: (0..n as u32).collect(),
            }]];
            &all
        } else {
            &self.priorities
        };
        // Envoy's priority load: a level takes min(100%, 1.4 × its healthy
        // share) of the traffic, the rest spills to the next level.
        let mut left = 100u64;
        let loads: Vec<u64> = levels
            .iter()
            .map(|level| {
                let (h, t) = level
                    .iter()
                    .flat_map(|g| &g.members)
                    .fold((0u64, 0u64), |(h, t), i| {
                        (h + u64::from(healthy(*i as usize)), t + 1)
                    });
                let health = (140 * h).checked_div(t).map_or(0, |x| x.min(100));
                let load = health.min(left);
                left -= load;
                load
            })
            .collect();
        let mut rng = rand::rng();
        for avoid_tried in [true, false] {
            if !avoid_tried && tried.is_empty() {
                break;
            }
            let usable = |i: &usize| (panic || healthy(*i)) && !(avoid_tried && tried.contains(i));
            let candidates: Vec<Vec<(u32, Vec<usize>)>> = levels
                .iter()
                .map(|level| {
                    level
                        .iter()
                        .map(|g| {
                            let c: Vec<usize> = g
                                .members
                                .iter()
                                .map(|i| *i as usize)
                                .filter(usable)
                                .collect();
                            (g.weight, c)
                        })
                        .filter(|(w, c)| *w > 0 && !c.is_empty())
                        .collect()
                })
                .collect();
            let total: u64 = candidates
                .iter()
                .zip(&loads)
                .filter(|(c, _)| !c.is_empty())
                .map(|(_, l)| *l)
                .sum();
            let level = if total == 0 {
                if avoid_tried && !remote && !tried.is_empty() {
                    // Only priorities with no share of traffic are left
                    // untried: stay in this one.
                    continue;
                }
                candidates.iter().position(|c| !c.is_empty())
            } else {
                let mut r = rng.random_range(0..total);
                candidates.iter().zip(&loads).position(|(c, l)| {
                    if c.is_empty() {
                        return false;
                    }
                    if r < *l {
                        return true;
                    }
                    r -= l;
                    false
                })
            };
            let Some(level) = level else {
                continue;
            };
            let groups = &candidates[level];
            let weights: u64 = groups.iter().map(|(w, _)| u64::from(*w)).sum();
            let mut r = if groups.len() == 1 {
                0
            } else {
                rng.random_range(0..weights)
            };
            for (w, c) in groups {
                if r < u64::from(*w) {
                    return Some(self.choose(key, Some(c)));
                }
                r -= u64::from(*w);
            }
        }
        None
    }

    /// The load balancer's pick among `among` (all endpoints when `None`).
    fn choose(&self, key: Option<u64>, among: Option<&[usize]>) -> usize {
        let n = among.map_or(self.endpoints.len(), <[usize]>::len);
        let at = |i: usize| among.map_or(i, |a| a[i]);
        let ok = |i: usize| among.is_none_or(|a| a.contains(&i));
        if n == 1 {
            return at(0);
        }
        match &self.lb {
            Lb::RoundRobin(next) => at(next.fetch_add(1, Ordering::Relaxed) % n),
            Lb::Random => at(rand::rng().random_range(0..n)),
            Lb::LeastRequest => {
                // Power of two choices: the less loaded of two random picks.
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (at(a), at(b));
                let la = self.endpoints[a].stats.active.load(Ordering::Relaxed);
                let lb = self.endpoints[b].stats.active.load(Ordering::Relaxed);
                if lb < la { b } else { a }
            }
            Lb::RingHash(ring) => match key {
                Some(k) if !ring.is_empty() => {
                    let pos = ring.partition_point(|(h, _)| *h < k);
                    // The first point at or after the key whose endpoint may be used.
                    (0..ring.len())
                        .map(|d| ring[(pos + d) % ring.len()].1 as usize)
                        .find(|i| ok(*i))
                        .unwrap_or_else(|| at(0))
                }
                _ => at(rand::rng().random_range(0..n)),
            },
            Lb::Maglev(table) => match key {
                Some(k) if !table.is_empty() => {
                    let start = (k % table.len() as u64) as usize;
                    (0..table.len())
                        .map(|d| table[(start + d) % table.len()] as usize)
                        .find(|i| ok(*i))
                        .unwrap_or_else(|| at(0))
                }
                _ => at(rand::rng().random_range(0..n)),
            },
        }
    }

    /// Feeds one try's outcome to outlier detection; ejects the endpoint
    /// when a detector crossed its threshold and the cluster may lose it.
    pub fn report(&self, endpoint: usize, o: Outcome) {
        let Some(cfg) = &self.outlier else {
            return;
        };
        let Some(e) = self.endpoints.get(endpoint) else {
            return;
        };
        let now = self.state.now_ms();
        if !e.stats.outlier.record(cfg, o, now) {
            return;
        }
        let ejected = self
            .endpoints
            .iter()
            .filter(|x| x.stats.outlier.is_ejected(now))
            .count();
        if !may_eject(cfg, ejected, self.endpoints.len()) {
            return;
        }
        let until = e.stats.outlier.eject(cfg, now);
        self.state
            .ejected_until_max
            .fetch_max(until, Ordering::Relaxed);
        tracing::info!(cluster = %self.name, endpoint = %e.addr, ejected_for_ms = until - now, "outlier detection ejected an endpoint");
    }

    /// Is there room for one more retry? Without `maxRetries`, Envoy's
    /// retry budget: retries in flight within 20% of active requests, at
    /// least 3.
    pub fn retry_allowed(&self) -> bool {
        let active = self.state.active_retries.load(Ordering::Relaxed);
        let limit = if self.limits.max_retries > 0 {
            self.limits.max_retries as usize
        } else {
            (self.state.active_requests.load(Ordering::Relaxed) / 5).max(3)
        };
        active < limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<Arc<Endpoint>> {
        let opts = crate::pool::PoolOptions::new(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(1),
        );
        let pools = crate::pool::Pools::new(opts);
        (0..n)
            .map(|i| {
                let addr: SocketAddr = format!("10.0.0.{}:80", i + 1).parse().expect("addr");
                Arc::new(
                    Endpoint::new(
                        addr,
                        Arc::new(EndpointStats::default()),
                        pools.get(crate::pool::PoolKey {
                            addr,
                            transport: crate::connect::Transport::Plaintext,
                            opts,
                        }),
                        LabelSet::unknown(),
                    )
                    .expect("endpoint"),
                )
            })
            .collect()
    }

    fn moved_fraction(build: impl Fn(&[Arc<Endpoint>]) -> Lb) -> f64 {
        let all = eps(10);
        let fewer: Vec<_> = all
            .iter()
            .filter(|e| e.addr.to_string() != "10.0.0.4:80")
            .cloned()
            .collect();
        let (a, b) = (build(&all), build(&fewer));
        let mk = |lb: Lb, e: Vec<Arc<Endpoint>>| Cluster {
            name: "c".into(),
            protocol: UpstreamProtocol::Http1,
            lb,
            hash: None,
            endpoints: e,
            no_endpoint_labels: Arc::new(LabelSet::unknown()),
            state: Arc::new(ClusterState::default()),
            limits: CircuitLimits::default(),
            conn_slots: None,
            outlier: None,
            priorities: Vec::new(),
            original_dst: None,
        };
        let (ca, cb) = (mk(a, all.clone()), mk(b, fewer));
        let mut moved = 0;
        let keys = 20_000;
        for k in 0..keys {
            let h = hash_bytes(format!("user-{k}").as_bytes());
            let ea = ca.pick(Some(h), &[]).map(|i| ca.endpoints[i].addr);
            let eb = cb.pick(Some(h), &[]).map(|i| cb.endpoints[i].addr);
            if ea != eb {
                moved += 1;
            }
        }
        moved as f64 / keys as f64
    }

    #[test]
    fn ring_hash_moves_about_one_nth_of_keys() {
        let f = moved_fraction(|e| Lb::ring_hash(e, 4096));
        assert!((0.05..0.16).contains(&f), "moved {f}");
    }

    #[test]
    fn maglev_moves_few_keys() {
        let f = moved_fraction(|e| Lb::maglev(e, 65537).expect("prime"));
        assert!((0.05..0.2).contains(&f), "moved {f}");
    }

    fn cluster_with(n: usize, outlier: Option<OutlierConfig>) -> Cluster {
        Cluster {
            name: "c".into(),
            protocol: UpstreamProtocol::Http1,
            lb: Lb::round_robin(),
            hash: None,
            endpoints: eps(n),
            no_endpoint_labels: Arc::new(LabelSet::unknown()),
            state: Arc::new(ClusterState::default()),
            limits: CircuitLimits::default(),
            conn_slots: None,
            outlier,
            priorities: Vec::new(),
            original_dst: None,
        }
    }

    fn detector(max_ejection_percent: u32) -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: 2,
            consecutive_gateway: 0,
            consecutive_local: 0,
            split: false,
            interval: std::time::Duration::from_secs(1),
            base_ejection: std::time::Duration::from_secs(10),
            max_ejection_percent,
            min_health_percent: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_gets_no_picks_until_its_time_is_up() {
        let c = cluster_with(3, Some(detector(50)));
        c.report(1, Outcome::Status(500));
        c.report(1, Outcome::Status(503));
        for _ in 0..100 {
            assert_ne!(c.pick(None, &[]), Some(1));
        }
        // A second endpoint may not go: 2 of 3 is over 50%.
        c.report(2, Outcome::LocalFailure);
        c.report(2, Outcome::LocalFailure);
        assert!((0..100).any(|_| c.pick(None, &[]) == Some(2)));
        tokio::time::advance(std::time::Duration::from_millis(9_900)).await;
        assert!((0..100).all(|_| c.pick(None, &[]) != Some(1)));
        tokio::time::advance(std::time::Duration::from_millis(200)).await;
        assert!((0..100).any(|_| c.pick(None, &[]) == Some(1)));
        // Ejected again at once: twice as long (20 s).
        c.report(1, Outcome::Status(500));
        c.report(1, Outcome::Status(500));
        tokio::time::advance(std::time::Duration::from_secs(15)).await;
        assert!((0..100).all(|_| c.pick(None, &[]) != Some(1)));
        tokio::time::advance(std::time::Duration::from_secs(6)).await;
        assert!((0..100).any(|_| c.pick(None, &[]) == Some(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn all_ejected_is_no_endpoint_and_panic_mode_ignores_ejections() {
        let c = cluster_with(1, Some(detector(100)));
        c.report(0, Outcome::Status(500));
        c.report(0, Outcome::Status(500));
        assert_eq!(
            c.pick(None, &[]),
            None,
            "503 UH: panic off (minHealthPercent 0)"
        );
        let mut cfg = detector(100);
        cfg.min_health_percent = 50;
        let c = cluster_with(2, Some(cfg));
        for i in 0..2 {
            c.report(i, Outcome::Status(500));
            c.report(i, Outcome::Status(500));
        }
        assert!(c.pick(None, &[]).is_some(), "below minHealthPercent: panic");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_avoids_endpoints_tried_while_others_are_left() {
        let c = cluster_with(3, None);
        for _ in 0..50 {
            let p = c.pick(None, &[0, 2]);
            assert_eq!(p, Some(1));
        }
        // Every endpoint tried: any may be picked again.
        assert!(c.pick(None, &[0, 1, 2]).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_budget_is_20_percent_of_requests_at_least_3() {
        let mut c = cluster_with(1, None);
        c.state.active_requests.store(10, Ordering::Relaxed);
        c.state.active_retries.store(2, Ordering::Relaxed);
        assert!(c.retry_allowed());
        c.state.active_retries.store(3, Ordering::Relaxed);
        assert!(!c.retry_allowed(), "min 3 when 20% of 10 is 2");
        c.state.active_requests.store(100, Ordering::Relaxed);
        assert!(c.retry_allowed());
        c.state.active_retries.store(20, Ordering::Relaxed);
        assert!(!c.retry_allowed());
        c.limits.max_retries = 50;
        assert!(c.retry_allowed(), "maxRetries replaces the budget");
    }

    /// Endpoints 0 and 1 in the proxy's locality (priority 0), 2 in the next.
    fn local_and_remote() -> Cluster {
        let mut c = cluster_with(3, Some(detector(100)));
        c.priorities = vec![
            vec![Group {
                weight: 1,
                members: vec![0, 1],
            }],
            vec![Group {
                weight: 1,
                members: vec![2],
            }],
        ];
        c
    }

    #[tokio::test(start_paused = true)]
    async fn locality_priorities_spill_as_health_drops() {
        let c = local_and_remote();
        for _ in 0..200 {
            assert_ne!(c.pick(None, &[]), Some(2), "priority 0 is healthy");
        }
        // Half of priority 0 ejected: it keeps 1.4 × 50% = 70% of traffic.
        c.report(0, Outcome::Status(500));
        c.report(0, Outcome::Status(500));
        let remote = (0..10_000).filter(|_| c.pick(None, &[]) == Some(2)).count();
        assert!(
            (2_600..3_400).contains(&remote),
            "{remote} of 10000 spilled"
        );
        c.report(1, Outcome::Status(500));
        c.report(1, Outcome::Status(500));
        assert!((0..100).all(|_| c.pick(None, &[]) == Some(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_leaves_its_locality_only_with_retry_remote_localities() {
        let c = local_and_remote();
        for _ in 0..50 {
            assert_ne!(c.pick_retry(None, &[0, 1], false), Some(2));
            assert_eq!(c.pick_retry(None, &[0, 1], true), Some(2));
        }
    }

    #[test]
    fn maglev_rejects_non_prime() {
        assert!(Lb::maglev(&eps(2), 65536).is_err());
    }
}
