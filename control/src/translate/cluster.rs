//! Outbound clusters: their names, and their load balancing from
//! DestinationRule traffic policies.

use bosun_xds_proto::config as pb;

use super::Ctx;
use super::duration::parse_duration_secs;
use super::prepared::load_assignment;
use super::resilience;
use crate::error::RefError;
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
    /// One traffic-policy field for host/subset/port, as Istio layers them:
    /// the subset's policy over the top-level one, each with its
    /// port-level setting over its own default.
    fn policy<T: Clone>(
        &self,
        host: &str,
        subset: &str,
        port: u32,
        get: impl Fn(&model::TrafficPolicy) -> Option<&T>,
        get_port: impl Fn(&model::PortTrafficPolicy) -> Option<&T>,
    ) -> Option<T> {
        let dr = &self.drs.get(host)?.value.spec;
        let from = |tp: &Option<model::TrafficPolicy>| -> Option<T> {
            let tp = tp.as_ref()?;
            // A matching port-level entry replaces the policy's fields
            // wholesale (Istio: port-level settings do not inherit).
            match tp
                .port_level_settings
                .iter()
                .find(|p| p.port.number == port)
            {
                Some(p) => get_port(p).cloned(),
                None => get(tp).cloned(),
            }
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

    fn lb_settings(&self, host: &str, subset: &str, port: u32) -> Option<LoadBalancerSettings> {
        self.policy(
            host,
            subset,
            port,
            |t| t.load_balancer.as_ref(),
            |p| p.load_balancer.as_ref(),
        )
    }

    /// Makes (once) the cluster for host/port/subset and returns its name.
    pub(super) fn cluster(
        &mut self,
        svc_idx: usize,
        port: u32,
        subset: &str,
    ) -> Result<String, RefError> {
        let svc = &self.reg.services[svc_idx];
        let name = cluster_name(port, subset, &svc.host);
        if self.clusters.contains_key(&name) {
            return Ok(name);
        }
        let sp = svc
            .port(port)
            .ok_or_else(|| RefError::NoPort {
                host: svc.host.clone(),
                port,
            })?
            .clone();
        let selector = if subset.is_empty() {
            Labels::new()
        } else {
            let dr = self.drs.get(&svc.host).ok_or_else(|| {
                match self.reg.refused_rules.get(&svc.host) {
                    Some(id) => RefError::RefusedRule {
                        subset: subset.to_string(),
                        host: svc.host.clone(),
                        by: id.clone(),
                    },
                    None => RefError::NoRule {
                        subset: subset.to_string(),
                        host: svc.host.clone(),
                    },
                }
            })?;
            dr.value
                .spec
                .subsets
                .iter()
                .find(|s| s.name == subset)
                .ok_or_else(|| RefError::NoSubset {
                    subset: subset.to_string(),
                    rule: dr.value.id(),
                })?
                .labels
                .clone()
        };
        let mut cluster = pb::Cluster {
            name: name.clone(),
            dns: svc.dns as i32,
            // Istio's meshConfig.dnsRefreshRate default.
            dns_refresh_ms: if svc.dns == pb::DnsLookup::None {
                0
            } else {
                60_000
            },
            protocol: sp.protocol.upstream() as i32,
            lb_policy: pb::LbPolicy::RoundRobin as i32,
            service_host: svc.host.clone(),
            service_name: svc.name.clone(),
            service_namespace: svc.namespace.clone(),
            ..Default::default()
        };
        let host = svc.host.clone();
        if let Some(cp) = self.policy(
            &host,
            subset,
            port,
            |t| t.connection_pool.as_ref(),
            |p| p.connection_pool.as_ref(),
        ) {
            // A bad policy is reported at its DestinationRule by `validate`.
            if let Ok((pool, h2)) = resilience::connection_pool(&cp) {
                if h2.is_some() && cluster.protocol == pb::UpstreamProtocol::Http1 as i32 {
                    cluster.protocol = pb::UpstreamProtocol::Http2 as i32;
                }
                cluster.connection_pool = Some(pool);
            }
        }
        if let Some(od) = self.policy(
            &host,
            subset,
            port,
            |t| t.outlier_detection.as_ref(),
            |p| p.outlier_detection.as_ref(),
        ) {
            cluster.outlier_detection = resilience::outlier(&od).ok();
        }
        if let Some(t) = self.policy(&host, subset, port, |t| t.tls.as_ref(), |p| p.tls.as_ref()) {
            let ns = self
                .drs
                .get(&host)
                .map(|d| d.value.namespace().to_string())
                .unwrap_or_default();
            cluster.tls =
                Some(
                    client_tls(self.cfg, &ns, &t).map_err(|message| RefError::Policy {
                        host: host.clone(),
                        field: "tls".into(),
                        message,
                    })?,
                );
        }
        let svc = &self.reg.services[svc_idx];
        let lb = self.lb_settings(&svc.host, subset, port);
        let lb_error = |message: String| RefError::Policy {
            host: host.clone(),
            field: "loadBalancer".into(),
            message,
        };
        cluster.locality_lb = locality_lb(
            lb.as_ref().and_then(|l| l.locality_lb_setting.as_ref()),
            cluster.outlier_detection.is_some(),
        )
        .map_err(lb_error)?;
        if let Some(lb) = lb {
            apply_lb(&mut cluster, &lb).map_err(lb_error)?;
        } else if svc.client_ip_affinity {
            cluster.lb_policy = pb::LbPolicy::RingHash as i32;
            cluster.hash_policy = Some(pb::HashPolicy {
                key: Some(pb::hash_policy::Key::SourceIp(true)),
            });
        }
        // Auto mTLS checks the peer is one of the service's workloads.
        let identities: std::collections::BTreeSet<String> = svc
            .endpoints
            .iter()
            .filter(|e| !e.service_account.is_empty())
            .map(|e| {
                super::security::spiffe(&self.params.trust_domain, &e.namespace, &e.service_account)
            })
            .collect();
        cluster.identities = identities.into_iter().collect();
        cluster.original_dst = svc.original_dst;
        let assignment = if self.params.check_only || svc.original_dst {
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

/// A DestinationRule's `tls` as the proxy applies it. Files stay paths
/// (the proxy reads them); a `credentialName` Secret is resolved and
/// checked here.
fn client_tls(
    cfg: &crate::model::Config,
    ns: &str,
    t: &model::ClientTlsSettings,
) -> Result<pb::UpstreamTls, String> {
    let mode = match t.mode.as_deref().unwrap_or("DISABLE") {
        "DISABLE" => pb::UpstreamTlsMode::Disable,
        "SIMPLE" => pb::UpstreamTlsMode::Simple,
        "MUTUAL" => pb::UpstreamTlsMode::Mutual,
        "ISTIO_MUTUAL" => pb::UpstreamTlsMode::IstioMutual,
        other => {
            return Err(format!(
                "mode {other:?}: want DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"
            ));
        }
    };
    let mut out = pb::UpstreamTls {
        mode: mode as i32,
        sni: t.sni.clone().unwrap_or_default(),
        subject_alt_names: t.subject_alt_names.clone(),
        insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
        ca_certificates_file: t.ca_certificates.clone().unwrap_or_default(),
        client_certificate_file: t.client_certificate.clone().unwrap_or_default(),
        private_key_file: t.private_key.clone().unwrap_or_default(),
        ..Default::default()
    };
    if let Some(name) = &t.credential_name {
        let cred =
            super::credentials::credential(cfg, ns, name, mode == pb::UpstreamTlsMode::Mutual)
                .map_err(|e| match e.secret {
                    Some(s) => format!("credentialName: {}: {}", s.value.id(), e.message),
                    None => format!("credentialName: {}", e.message),
                })?;
        out.client_certificate = cred.cert;
        out.private_key = cred.key;
        out.ca_certificates = cred.ca;
    }
    if mode == pb::UpstreamTlsMode::Mutual
        && out.client_certificate.is_empty()
        && out.client_certificate_file.is_empty()
    {
        return Err("MUTUAL needs clientCertificate and privateKey (or credentialName)".into());
    }
    Ok(out)
}

/// Istio's locality load balancing: on by default, but endpoints fail over
/// between localities only where outlier detection can eject them; with
/// neither `distribute` nor outlier detection, localities are ignored.
fn locality_lb(
    setting: Option<&model::LocalityLbSetting>,
    outlier: bool,
) -> Result<Option<pb::LocalityLb>, String> {
    let default = model::LocalityLbSetting::default();
    let s = setting.unwrap_or(&default);
    if s.enabled == Some(false) {
        return Ok(None);
    }
    if !s.distribute.is_empty() && !s.failover.is_empty() {
        return Err(
            "localityLbSetting: set distribute or failover, not both (Istio refuses both)".into(),
        );
    }
    let mut out = pb::LocalityLb {
        failover_priority: s.failover_priority.clone(),
        ..Default::default()
    };
    for f in &s.failover {
        if f.from.contains('/') || f.to.contains('/') {
            return Err(format!(
                "localityLbSetting.failover {} -> {}: failover is between regions (no '/')",
                f.from, f.to
            ));
        }
        out.failover.push(pb::LocalityFailover {
            from: f.from.clone(),
            to: f.to.clone(),
        });
    }
    for d in &s.distribute {
        let total: u32 = d.to.values().sum();
        if total != 100 {
            return Err(format!(
                "localityLbSetting.distribute from {}: weights sum to {total}, not 100",
                d.from
            ));
        }
        out.distribute.push(pb::LocalityDistribute {
            from: d.from.clone(),
            to: d.to.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        });
    }
    if out.distribute.is_empty() && !outlier {
        return Ok(None);
    }
    Ok(Some(out))
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
