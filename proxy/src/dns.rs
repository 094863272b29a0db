//! DNS endpoints (ServiceEntry `resolution: DNS` / `DNS_ROUND_ROBIN`): the
//! proxy resolves the names itself, as Envoy's STRICT_DNS and LOGICAL_DNS
//! clusters do, and re-resolves every cluster's refresh interval. Lookups
//! go through the system resolver (getaddrinfo, so `/etc/hosts` counts),
//! IPv4 only, as Istio's proxies default to. A failed lookup is logged and
//! counted and the last good addresses are kept; a changed answer rebuilds
//! the snapshot from the config last applied.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use bosun_xds_proto::config as pb;

/// Names to resolve, with the shortest refresh interval that asked for them.
pub fn names(cfg: &pb::ProxyConfig) -> BTreeMap<String, Duration> {
    let dns: BTreeMap<&str, u64> = cfg
        .clusters
        .iter()
        .filter(|c| c.dns != pb::DnsLookup::None as i32)
        .map(|c| (c.name.as_str(), c.dns_refresh_ms.max(100)))
        .collect();
    let mut out: BTreeMap<String, Duration> = BTreeMap::new();
    for a in &cfg.load_assignments {
        let Some(refresh) = dns.get(a.cluster.as_str()) else {
            continue;
        };
        for e in &a.endpoints {
            if e.address.parse::<IpAddr>().is_err() {
                let d = Duration::from_millis(*refresh);
                out.entry(e.address.clone())
                    .and_modify(|x| *x = (*x).min(d))
                    .or_insert(d);
            }
        }
    }
    out
}

/// Last good addresses by name.
#[derive(Debug, Default)]
pub struct DnsCache {
    map: Mutex<BTreeMap<String, Vec<IpAddr>>>,
}

/// What one lookup did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    Changed,
    Same,
    /// Failed or empty: the last good addresses stay.
    Failed,
}

impl DnsCache {
    pub fn addresses(&self, name: &str) -> Vec<IpAddr> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).cloned().unwrap_or_default()
    }

    /// Resolves `name`. A failure keeps the old addresses.
    pub async fn refresh(&self, name: &str) -> Refresh {
        // In the resolver's order (LOGICAL takes the first), duplicates dropped.
        let found: Result<Vec<IpAddr>, std::io::Error> =
            tokio::net::lookup_host((name, 0u16)).await.map(|it| {
                let mut seen = BTreeSet::new();
                it.map(|sa| sa.ip())
                    .filter(|ip| ip.is_ipv4() && seen.insert(*ip))
                    .collect()
            });
        let ips: Vec<IpAddr> = match found {
            Ok(s) if !s.is_empty() => s,
            Ok(_) => {
                tracing::warn!(%name, "DNS: no IPv4 address; keeping the last good ones");
                return Refresh::Failed;
            }
            Err(e) => {
                tracing::warn!(%name, error = %e, "DNS lookup failed; keeping the last good addresses");
                return Refresh::Failed;
            }
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let old = map.insert(name.to_string(), ips.clone());
        if old.as_ref() == Some(&ips) {
            Refresh::Same
        } else {
            Refresh::Changed
        }
    }

    /// Forgets names no config asks for any more.
    pub fn retain(&self, names: &BTreeMap<String, Duration>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|k, _| names.contains_key(k));
    }
}
