//! The nftables backend: what kube-proxy's nftables mode programs, in table
//! `ip bosun`, as `nft -f` text.
//!
//! Dispatch is one verdict map keyed on `address . protocol . port`
//! (`service-ips`) and one on `protocol . port` for NodePorts
//! (`service-nodeports`, behind `fib daddr type local`). Each service port
//! has a chain choosing an endpoint with `numgen random mod N`; with
//! `sessionAffinity: ClientIP` each endpoint gets its own chain that records
//! the client in a dynamic timeout set. Services without endpoints are in
//! `no-endpoint-*` maps, checked in filter hooks, that reject (or drop, for
//! a `Local` policy with no local endpoint).
//!
//! A sync is rendered into named pieces (sets, chains, map elements), so
//! the next sync sends only the pieces that changed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use crate::services::{Endpoint, ServiceMap, ServicePort};

pub const TABLE: &str = "bosun";

/// Node-wide settings that shape the rules.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Pod CIDR: cluster-IP traffic from outside it is masqueraded.
    pub cluster_cidr: Option<String>,
}

/// The table's contents, by name, so that two renderings can be diffed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rendered {
    /// Set name → its declaration body.
    pub sets: BTreeMap<String, String>,
    /// Chain name → its rules.
    pub chains: BTreeMap<String, Vec<String>>,
    /// (map or set, key) → verdict or value ("" for set elements).
    pub elements: BTreeMap<(&'static str, String), String>,
}

const MAPS: &str = "\
  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }
  map service-nodeports { type inet_proto . inet_service : verdict; }
  map no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict; }
  map no-endpoint-nodeports { type inet_proto . inet_service : verdict; }
  map firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict; }
  set hairpin { type ipv4_addr . ipv4_addr; }
";

const BASE_CHAINS: &str = "\
  chain filter-prerouting { type filter hook prerouting priority dstnat - 10; policy accept; ct state new jump firewall-check; }
  chain filter-input { type filter hook input priority -110; policy accept; ct state new jump endpoints-check; }
  chain filter-forward { type filter hook forward priority -110; policy accept; ct state new jump endpoints-check; }
  chain filter-output { type filter hook output priority -110; policy accept; ct state new jump firewall-check; ct state new jump endpoints-check; }
  chain firewall-check { ip daddr . meta l4proto . th dport vmap @firewall-ips; }
  chain endpoints-check { ip daddr . meta l4proto . th dport vmap @no-endpoint-services; fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports; }
  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }
  chain nat-output { type nat hook output priority -100; policy accept; jump services; }
  chain nat-postrouting { type nat hook postrouting priority srcnat; policy accept; jump masquerading; }
  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports; }
  chain mark-for-masquerade { meta mark set meta mark or 0x4000; }
  chain masquerading { ct status dnat ip saddr . ip daddr @hairpin masquerade; meta mark & 0x4000 == 0 return; meta mark set meta mark xor 0x4000; masquerade fully-random; }
  chain reject-chain { reject; }
";

fn ep_key(e: &Endpoint) -> String {
    format!("{}_{}", e.ip, e.port)
}

/// `numgen` ranges: each endpoint gets a share of `0..total` by weight.
fn ranges(eps: &[Endpoint]) -> (u64, Vec<(String, &Endpoint)>) {
    let total: u64 = eps.iter().map(|e| u64::from(e.weight)).sum();
    let mut at = 0u64;
    let mut out = Vec::new();
    for e in eps {
        let w = u64::from(e.weight);
        let r = if w == 1 {
            at.to_string()
        } else {
            format!("{}-{}", at, at + w - 1)
        };
        out.push((r, e));
        at += w;
    }
    (total, out)
}

fn dnat(proto: &str, e: &Endpoint) -> String {
    format!("meta l4proto {proto} dnat to {}:{}", e.ip, e.port)
}

/// Rules that pick one of `eps` (non-empty) for a new connection.
fn select(sp: &ServicePort, eps: &[Endpoint], r: &mut Rendered) -> Vec<String> {
    let proto = sp.proto.as_str();
    let mut rules = Vec::new();
    if let Some(timeout) = sp.affinity_timeout {
        let ep_chain = |e: &Endpoint| format!("ep-{}-{}", sp.id, ep_key(e));
        // The timeout is in the name: a new timeout is a new set.
        let set = |e: &Endpoint| format!("aff-{}-{}-{timeout}", sp.id, ep_key(e));
        for e in eps {
            r.sets.insert(
                set(e),
                format!("type ipv4_addr; flags dynamic,timeout; timeout {timeout}s;"),
            );
            r.chains.insert(
                ep_chain(e),
                vec![format!("update @{} {{ ip saddr }}", set(e)), dnat(proto, e)],
            );
            rules.push(format!("ip saddr @{} goto {}", set(e), ep_chain(e)));
        }
        if eps.len() == 1 {
            rules.push(format!("goto {}", ep_chain(&eps[0])));
        } else {
            let (total, rs) = ranges(eps);
            let arms: Vec<String> = rs
                .iter()
                .map(|(range, e)| format!("{range} : goto {}", ep_chain(e)))
                .collect();
            rules.push(format!(
                "numgen random mod {total} vmap {{ {} }}",
                arms.join(", ")
            ));
        }
    } else if eps.len() == 1 {
        rules.push(dnat(proto, &eps[0]));
    } else {
        let (total, rs) = ranges(eps);
        let arms: Vec<String> = rs
            .iter()
            .map(|(range, e)| format!("{range} : {} . {}", e.ip, e.port))
            .collect();
        rules.push(format!(
            "meta l4proto {proto} dnat to numgen random mod {total} map {{ {} }}",
            arms.join(", ")
        ));
    }
    rules
}

fn render_service(sp: &ServicePort, opts: &Options, r: &mut Rendered) {
    let proto = sp.proto.as_str();
    let all = &sp.endpoints;
    let local = sp.local_endpoints();
    let svc_chain = format!("svc-{}", sp.id);
    let local_chain = format!("local-{}", sp.id);
    let ext_chain = format!("ext-{}", sp.id);
    if !all.is_empty() {
        let mut rules = Vec::new();
        if let Some(cidr) = &opts.cluster_cidr
            && !sp.cluster_ips.is_empty()
        {
            let ips: Vec<String> = sp.cluster_ips.iter().map(|i| i.to_string()).collect();
            rules.push(format!(
                "ip daddr {{ {} }} ip saddr != {cidr} jump mark-for-masquerade",
                ips.join(", ")
            ));
        }
        rules.extend(select(sp, all, r));
        r.chains.insert(svc_chain.clone(), rules);
        for e in all {
            r.elements
                .insert(("hairpin", format!("{} . {}", e.ip, e.ip)), String::new());
        }
    }
    let needs_local =
        (sp.internal_local || (sp.external_local && sp.has_external())) && !local.is_empty();
    if needs_local {
        let rules = select(sp, &local, r);
        r.chains.insert(local_chain.clone(), rules);
    }
    // What a connection to each address of this service port does.
    let verdict = |policy_local: bool| -> (bool, String) {
        match (policy_local, all.is_empty(), local.is_empty()) {
            (_, true, _) => (false, "goto reject-chain".into()),
            (true, false, true) => (false, "drop".into()),
            (true, false, false) => (true, format!("goto {local_chain}")),
            (false, false, _) => (true, format!("goto {svc_chain}")),
        }
    };
    let (ok, v) = verdict(sp.internal_local);
    for ip in &sp.cluster_ips {
        let map = if ok {
            "service-ips"
        } else {
            "no-endpoint-services"
        };
        r.elements
            .insert((map, format!("{ip} . {proto} . {}", sp.port)), v.clone());
    }
    if sp.has_external() {
        let (ok, v) = verdict(sp.external_local);
        let v = if ok {
            let mut rules = Vec::new();
            if sp.external_local {
                rules.push(format!("goto {local_chain}"));
            } else {
                rules.push("jump mark-for-masquerade".to_string());
                rules.push(format!("goto {svc_chain}"));
            }
            r.chains.insert(ext_chain.clone(), rules);
            format!("goto {ext_chain}")
        } else {
            v
        };
        for ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
            let map = if ok {
                "service-ips"
            } else {
                "no-endpoint-services"
            };
            r.elements
                .insert((map, format!("{ip} . {proto} . {}", sp.port)), v.clone());
        }
        if let Some(np) = sp.node_port {
            let map = if ok {
                "service-nodeports"
            } else {
                "no-endpoint-nodeports"
            };
            r.elements.insert((map, format!("{proto} . {np}")), v);
        }
    }
    if !sp.source_ranges.is_empty() && !sp.load_balancer_ips.is_empty() {
        let fw = format!("fw-{}", sp.id);
        r.chains.insert(
            fw.clone(),
            vec![format!(
                "ip saddr != {{ {} }} drop",
                sp.source_ranges.join(", ")
            )],
        );
        for ip in &sp.load_balancer_ips {
            r.elements.insert(
                ("firewall-ips", format!("{ip} . {proto} . {}", sp.port)),
                format!("goto {fw}"),
            );
        }
    }
}

/// Renders every service port.
pub fn render(services: &ServiceMap, opts: &Options) -> Rendered {
    let mut r = Rendered::default();
    for sp in services.values() {
        render_service(sp, opts, &mut r);
    }
    r
}

fn element_line(out: &mut String, verb: &str, map: &str, key: &str, value: &str) {
    if value.is_empty() || verb == "delete" {
        let _ = writeln!(out, "{verb} element ip {TABLE} {map} {{ {key} }}");
    } else {
        let _ = writeln!(out, "{verb} element ip {TABLE} {map} {{ {key} : {value} }}");
    }
}

/// A whole-table transaction: the table is replaced atomically (dynamic
/// affinity entries are lost, as in kube-proxy's full resync).
pub fn full_text(r: &Rendered) -> String {
    let mut out = String::with_capacity(256 + r.chains.len() * 160);
    let _ = writeln!(out, "add table ip {TABLE}");
    let _ = writeln!(out, "delete table ip {TABLE}");
    let _ = writeln!(
        out,
        "table ip {TABLE} {{\n  comment \"Bosun node mode: Service load balancing\";\n{MAPS}{BASE_CHAINS}}}"
    );
    for (name, body) in &r.sets {
        let _ = writeln!(out, "add set ip {TABLE} {name} {{ {body} }}");
    }
    for name in r.chains.keys() {
        let _ = writeln!(out, "add chain ip {TABLE} {name}");
    }
    for (name, rules) in &r.chains {
        for rule in rules {
            let _ = writeln!(out, "add rule ip {TABLE} {name} {rule}");
        }
    }
    for ((map, key), value) in &r.elements {
        element_line(&mut out, "add", map, key, value);
    }
    out
}

/// The transaction that turns `old` into `new`, touching only what
/// changed; `None` when nothing did.
pub fn diff_text(old: &Rendered, new: &Rendered) -> Option<String> {
    let mut out = String::new();
    // New sets, then new chains (so rules may refer to them).
    for (name, body) in &new.sets {
        if !old.sets.contains_key(name) {
            let _ = writeln!(out, "add set ip {TABLE} {name} {{ {body} }}");
        }
    }
    let new_chains: BTreeSet<&String> = new
        .chains
        .keys()
        .filter(|n| !old.chains.contains_key(*n))
        .collect();
    for name in &new_chains {
        let _ = writeln!(out, "add chain ip {TABLE} {name}");
    }
    for (name, rules) in &new.chains {
        if old.chains.get(name) == Some(rules) {
            continue;
        }
        if !new_chains.contains(name) {
            let _ = writeln!(out, "flush chain ip {TABLE} {name}");
        }
        for rule in rules {
            let _ = writeln!(out, "add rule ip {TABLE} {name} {rule}");
        }
    }
    for ((map, key), value) in &old.elements {
        if new.elements.get(&(*map, key.clone())) != Some(value) {
            element_line(&mut out, "delete", map, key, value);
        }
    }
    for ((map, key), value) in &new.elements {
        if old.elements.get(&(*map, key.clone())) != Some(value) {
            element_line(&mut out, "add", map, key, value);
        }
    }
    // Stale chains: emptied first (they may refer to each other), then gone.
    let stale: Vec<&String> = old
        .chains
        .keys()
        .filter(|n| !new.chains.contains_key(*n))
        .collect();
    for name in &stale {
        let _ = writeln!(out, "flush chain ip {TABLE} {name}");
    }
    for name in &stale {
        let _ = writeln!(out, "delete chain ip {TABLE} {name}");
    }
    for name in old.sets.keys() {
        if !new.sets.contains_key(name) {
            let _ = writeln!(out, "delete set ip {TABLE} {name}");
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Removes everything node mode programmed.
pub fn cleanup_text() -> String {
    format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")
}
