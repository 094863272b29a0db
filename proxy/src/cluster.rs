//! Clusters, endpoints and load balancing.
//!
//! Per-endpoint state (in-flight requests, for LEAST_REQUEST) lives in an
//! [`EndpointRegistry`] keyed by address, so it survives config swaps: a new
//! snapshot sees the requests the old one still has in flight.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use http::HeaderName;
use http::uri::Authority;
use rand::RngExt;

use crate::error::RejectError;
use crate::metrics::LabelSet;
use crate::pool::Pool;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    Tcp,
    /// Same as the downstream request (inbound listeners).
    Downstream,
}

/// Live per-endpoint load state (in-flight requests; later outlier and
/// circuit-breaker state). Connections live in [`Pool`]s, not here.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub active: AtomicUsize,
}

/// Endpoint stats by address, shared by all snapshots.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    stats: Mutex<HashMap<SocketAddr, Weak<EndpointStats>>>,
}

impl EndpointRegistry {
    pub fn stats(&self, addr: SocketAddr) -> Arc<EndpointStats> {
        let mut map = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(&addr).and_then(Weak::upgrade) {
            return s;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let s = Arc::new(EndpointStats::default());
        map.insert(addr, Arc::downgrade(&s));
        s
    }
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
}

impl Cluster {
    /// Picks an endpoint. `key` is the request's hash key for hash policies
    /// (a missing key falls back to a random pick, as Envoy does).
    pub fn pick(&self, key: Option<u64>) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            return self.endpoints.first();
        }
        let i = match &self.lb {
            Lb::RoundRobin(next) => next.fetch_add(1, Ordering::Relaxed) % n,
            Lb::Random => rand::rng().random_range(0..n),
            Lb::LeastRequest => {
                // Power of two choices: the less loaded of two random picks.
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let la = self.endpoints[a].stats.active.load(Ordering::Relaxed);
                let lb = self.endpoints[b].stats.active.load(Ordering::Relaxed);
                if lb < la { b } else { a }
            }
            Lb::RingHash(ring) => match key {
                Some(k) => {
                    let pos = ring.partition_point(|(h, _)| *h < k);
                    ring[if pos == ring.len() { 0 } else { pos }].1 as usize
                }
                None => rand::rng().random_range(0..n),
            },
            Lb::Maglev(table) => match key {
                Some(k) => table[(k % table.len() as u64) as usize] as usize,
                None => rand::rng().random_range(0..n),
            },
        };
        self.endpoints.get(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<Arc<Endpoint>> {
        let pools = crate::pool::Pools::new(crate::pool::PoolOptions {
            connect_timeout: std::time::Duration::from_secs(1),
            idle_timeout: std::time::Duration::from_secs(1),
        });
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
        };
        let (ca, cb) = (mk(a, all.clone()), mk(b, fewer));
        let mut moved = 0;
        let keys = 20_000;
        for k in 0..keys {
            let h = hash_bytes(format!("user-{k}").as_bytes());
            let ea = ca.pick(Some(h)).map(|e| e.addr);
            let eb = cb.pick(Some(h)).map(|e| e.addr);
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

    #[test]
    fn maglev_rejects_non_prime() {
        assert!(Lb::maglev(&eps(2), 65536).is_err());
    }
}
