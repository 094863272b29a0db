//! Outbound clusters: their names, and their load balancing from
//! DestinationRule traffic policies.

use bosun_xds_proto::config as pb;

use super::Ctx;
use super::duration::parse_duration_secs;
use super::prepared::load_assignment;
use crate::model::{self, Labels, LoadBalancerSettings};

/// Deterministic content hash: the same config gives the same version anywhere.
pub(super) fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn cluster_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// The host of an outbound cluster name (`outbound|port|subset|host`).
pub fn cluster_host(name: &str) -> Option<&str> {
    name.strip_prefix("outbound|")?.splitn(3, '|').nth(2)
}

impl Ctx<'_> {
    fn lb_settings(&self, host: &str, subset: &str, port: u32) -> Option<LoadBalancerSettings> {
        let dr = &self.drs.get(host)?.value.spec;
        let from = |tp: &Option<model::TrafficPolicy>| -> Option<LoadBalancerSettings> {
            let tp = tp.as_ref()?;
            tp.port_level_settings
                .iter()
                .find(|p| p.port.number == port)
                .and_then(|p| p.load_balancer.clone())
                .or_else(|| tp.load_balancer.clone())
        };
        let subset_tp = dr
            .subsets
            .iter()
            .find(|s| s.name == subset)
            .map(|s| &s.traffic_policy);
        subset_tp
            .and_then(from)
            .or_else(|| from(&dr.traffic_policy))
    }

    /// Makes (once) the cluster for host/port/subset and returns its name.
    pub(super) fn cluster(
        &mut self,
        svc_idx: usize,
        port: u32,
        subset: &str,
    ) -> Result<String, String> {
        let svc = &self.reg.services[svc_idx];
        let name = cluster_name(port, subset, &svc.host);
        if self.clusters.contains_key(&name) {
            return Ok(name);
        }
        let sp = svc
            .port(port)
            .ok_or_else(|| format!("{} has no port {port}", svc.host))?
            .clone();
        let selector = if subset.is_empty() {
            Labels::new()
        } else {
            let dr = self
                .drs
                .get(&svc.host)
                .ok_or_else(|| format!("subset {subset}: no DestinationRule for {}", svc.host))?;
            dr.value
                .spec
                .subsets
                .iter()
                .find(|s| s.name == subset)
                .ok_or_else(|| {
                    format!(
                        "subset {subset} is not defined in DestinationRule {}",
                        dr.value.id()
                    )
                })?
                .labels
                .clone()
        };
        let mut cluster = pb::Cluster {
            name: name.clone(),
            protocol: sp.protocol.upstream() as i32,
            lb_policy: pb::LbPolicy::RoundRobin as i32,
            service_host: svc.host.clone(),
            service_name: svc.name.clone(),
            service_namespace: svc.namespace.clone(),
            ..Default::default()
        };
        if let Some(lb) = self.lb_settings(&svc.host, subset, port) {
            apply_lb(&mut cluster, &lb)?;
        } else if svc.client_ip_affinity {
            cluster.lb_policy = pb::LbPolicy::RingHash as i32;
            cluster.hash_policy = Some(pb::HashPolicy {
                key: Some(pb::hash_policy::Key::SourceIp(true)),
            });
        }
        let assignment = if self.params.check_only {
            pb::ClusterLoadAssignment {
                cluster: name.clone(),
                endpoints: Vec::new(),
            }
        } else {
            load_assignment(&name, svc, &sp, &selector)
        };
        self.assignments.insert(name.clone(), assignment);
        self.clusters.insert(name.clone(), cluster);
        Ok(name)
    }
}

fn apply_lb(c: &mut pb::Cluster, lb: &LoadBalancerSettings) -> Result<(), String> {
    if let Some(simple) = &lb.simple {
        c.lb_policy = match simple.as_str() {
            "ROUND_ROBIN" | "UNSPECIFIED" => pb::LbPolicy::RoundRobin,
            "LEAST_REQUEST" | "LEAST_CONN" => pb::LbPolicy::LeastRequest,
            "RANDOM" => pb::LbPolicy::Random,
            other => {
                return Err(format!(
                    "loadBalancer.simple {other} is not supported (ROUND_ROBIN, LEAST_REQUEST, RANDOM)"
                ));
            }
        } as i32;
    }
    if let Some(ch) = &lb.consistent_hash {
        use pb::hash_policy::Key;
        let key = if let Some(h) = &ch.http_header_name {
            Key::HeaderName(h.to_ascii_lowercase())
        } else if let Some(ck) = &ch.http_cookie {
            Key::Cookie(pb::hash_policy::Cookie {
                name: ck.name.clone(),
                path: ck.path.clone().unwrap_or_default(),
                ttl_seconds: match &ck.ttl {
                    Some(t) => parse_duration_secs(t)?,
                    None => 0,
                },
            })
        } else if ch.use_source_ip == Some(true) {
            Key::SourceIp(true)
        } else if let Some(q) = &ch.http_query_parameter_name {
            Key::QueryParameter(q.clone())
        } else {
            return Err("consistentHash needs one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into());
        };
        c.hash_policy = Some(pb::HashPolicy { key: Some(key) });
        if let Some(m) = &ch.maglev {
            c.lb_policy = pb::LbPolicy::Maglev as i32;
            c.table_size = m.table_size.unwrap_or(0);
        } else {
            c.lb_policy = pb::LbPolicy::RingHash as i32;
            c.table_size = ch
                .ring_hash
                .as_ref()
                .and_then(|r| r.minimum_ring_size)
                .or(ch.minimum_ring_size)
                .unwrap_or(0);
        }
    }
    Ok(())
}
