//! Locality load balancing (DestinationRule `localityLbSetting`) as Istio
//! assigns it: endpoints get priorities relative to the proxy's own
//! locality (same zone first, then region, then the `failover` region, then
//! the rest) or by `failoverPriority` labels, or weights by `distribute`.
//! The result is the [`Group`]s the cluster picks from.

use std::collections::BTreeMap;

use bosun_xds_proto::config as pb;

use crate::cluster::Group;

const REGION: &str = "topology.kubernetes.io/region";
const ZONE: &str = "topology.kubernetes.io/zone";
const SUBZONE: &str = "topology.istio.io/subzone";

/// `region/zone/subzone`, each part possibly empty.
fn parts(l: &str) -> [&str; 3] {
    let mut it = l.splitn(3, '/');
    [
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
    ]
}

/// `distribute` patterns: `region/zone/*`, `*`, a missing part matches any.
fn pattern_matches(pattern: &str, locality: &str) -> bool {
    let l = parts(locality);
    pattern
        .split('/')
        .enumerate()
        .all(|(i, p)| p == "*" || (i < 3 && p == l[i]))
}

/// Istio's locality priority: 0 same subzone, 1 same zone, 2 same region,
/// 3 the failover region (or any other region without `failover`), 4 the rest.
fn locality_priority(own: [&str; 3], ep: [&str; 3], failover_to: Option<&str>) -> u32 {
    if own[0] != ep[0] {
        return match failover_to {
            Some(to) if to == ep[0] => 3,
            Some(_) => 4,
            None => 3,
        };
    }
    if own[1] != ep[1] {
        return 2;
    }
    if own[2] != ep[2] {
        return 1;
    }
    0
}

fn label_value<'a>(
    labels: &'a BTreeMap<String, String>,
    locality: [&'a str; 3],
    name: &str,
) -> Option<&'a str> {
    match name {
        REGION => Some(locality[0]),
        ZONE => Some(locality[1]),
        SUBZONE => Some(locality[2]),
        _ => labels.get(name).map(String::as_str),
    }
}

/// `failoverPriority`: matching the proxy on the first k of n labels (and
/// not the next) is priority n - k.
fn label_priority(
    names: &[String],
    own: [&str; 3],
    own_labels: &BTreeMap<String, String>,
    ep: [&str; 3],
    ep_labels: &BTreeMap<String, String>,
) -> u32 {
    let n = names.len() as u32;
    for (j, l) in names.iter().enumerate() {
        let (name, want) = match l.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (l.as_str(), label_value(own_labels, own, l)),
        };
        let have = label_value(ep_labels, ep, name);
        if want.is_none() || have != want {
            return n - j as u32;
        }
    }
    0
}

/// Priorities (lowest first) of groups of endpoint indices. Empty when
/// every endpoint is in one priority with one weight (the fast path).
pub fn priorities<'a>(
    cfg: &pb::LocalityLb,
    own: &str,
    own_labels: &BTreeMap<String, String>,
    endpoints: impl Iterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
) -> Vec<Vec<Group>> {
    let eps: Vec<_> = endpoints.collect();
    let own_p = parts(own);
    if !cfg.distribute.is_empty() {
        let Some(d) = cfg
            .distribute
            .iter()
            .find(|d| pattern_matches(&d.from, own))
        else {
            return Vec::new();
        };
        // Each `to` key is a group; endpoints matching none get no traffic.
        let mut groups: Vec<Group> =
            d.to.values()
                .map(|w| Group {
                    weight: *w,
                    members: Vec::new(),
                })
                .collect();
        for (i, (loc, _)) in eps.iter().enumerate() {
            if let Some(g) = d.to.keys().position(|k| pattern_matches(k, loc)) {
                groups[g].members.push(i as u32);
            }
        }
        return vec![groups];
    }
    if own.is_empty() && cfg.failover_priority.is_empty() {
        return Vec::new();
    }
    let failover_to = cfg
        .failover
        .iter()
        .find(|f| f.from == own_p[0])
        .map(|f| f.to.as_str());
    let mut by_priority: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (i, (loc, labels)) in eps.iter().enumerate() {
        let ep = parts(loc);
        let loc_p = if own.is_empty() {
            0
        } else {
            locality_priority(own_p, ep, failover_to)
        };
        let p = if cfg.failover_priority.is_empty() {
            loc_p
        } else {
            let lp = label_priority(&cfg.failover_priority, own_p, own_labels, ep, labels);
            if cfg.failover.is_empty() {
                lp
            } else {
                lp * 5 + loc_p
            }
        };
        by_priority.entry(p).or_default().push(i as u32);
    }
    if by_priority.len() <= 1 {
        return Vec::new();
    }
    // Compacted: only the priorities that have endpoints, in order.
    by_priority
        .into_values()
        .map(|members| vec![Group { weight: 1, members }])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prio(cfg: &pb::LocalityLb, own: &str, eps: &[&str]) -> Vec<Vec<u32>> {
        let none = BTreeMap::new();
        priorities(cfg, own, &none, eps.iter().map(|l| (*l, &none)))
            .into_iter()
            .map(|level| level.into_iter().flat_map(|g| g.members).collect())
            .collect()
    }

    #[test]
    fn zone_then_region_then_failover_region() {
        let cfg = pb::LocalityLb {
            failover: vec![pb::LocalityFailover {
                from: "us".into(),
                to: "eu".into(),
            }],
            ..Default::default()
        };
        let eps = ["us/a/x", "us/b/x", "eu/a/x", "ap/a/x", "us/a/x"];
        assert_eq!(
            prio(&cfg, "us/a/x", &eps),
            vec![vec![0, 4], vec![1], vec![2], vec![3]]
        );
        // Unknown own locality: one priority.
        assert!(prio(&cfg, "", &eps).is_empty());
    }

    #[test]
    fn distribute_weights_localities() {
        let cfg = pb::LocalityLb {
            distribute: vec![pb::LocalityDistribute {
                from: "us/a/*".into(),
                to: [("us/a/*".to_string(), 80), ("us/b/*".to_string(), 20)]
                    .into_iter()
                    .collect(),
            }],
            ..Default::default()
        };
        let none = BTreeMap::new();
        let eps = ["us/a/1", "us/b/1", "eu/c/1"];
        let p = priorities(&cfg, "us/a/1", &none, eps.iter().map(|l| (*l, &none)));
        assert_eq!(
            p,
            vec![vec![
                Group {
                    weight: 80,
                    members: vec![0]
                },
                Group {
                    weight: 20,
                    members: vec![1]
                }
            ]]
        );
    }

    #[test]
    fn failover_priority_labels() {
        let cfg = pb::LocalityLb {
            failover_priority: vec!["network".into(), REGION.into()],
            ..Default::default()
        };
        let own: BTreeMap<String, String> = [("network".to_string(), "n1".to_string())].into();
        let n1 = own.clone();
        let n2: BTreeMap<String, String> = [("network".to_string(), "n2".to_string())].into();
        let eps = [("us/a", &n1), ("eu/a", &n1), ("us/a", &n2)];
        let p: Vec<Vec<u32>> = priorities(&cfg, "us/a", &own, eps.into_iter())
            .into_iter()
            .map(|l| l.into_iter().flat_map(|g| g.members).collect())
            .collect();
        assert_eq!(p, vec![vec![0], vec![1], vec![2]]);
    }
}
