//! The iptables backend, for hosts without nftables: the same behaviour as
//! [`crate::nft`], in kube-proxy's iptables layout (`BOSUN-SERVICES`,
//! `BOSUN-SVC-*`, `BOSUN-SEP-*`, ...), loaded with `iptables-restore
//! --noflush` so only Bosun's chains are touched. Endpoint choice is
//! `-m statistic --mode random` with probabilities from the weights;
//! affinity is `-m recent`. Every sync rewrites all of Bosun's chains
//! (iptables has no map to patch); stale chains are deleted.

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::nft::Options;
use crate::services::{Endpoint, Family, ServiceMap, ServicePort};
use std::net::IpAddr;

/// Bosun's chains that builtin chains jump to: (table, builtin, rule).
pub const JUMPS: &[(&str, &str, &str)] = &[
    ("nat", "PREROUTING", "-j BOSUN-SERVICES"),
    ("nat", "OUTPUT", "-j BOSUN-SERVICES"),
    ("nat", "POSTROUTING", "-j BOSUN-POSTROUTING"),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -j BOSUN-FILTER",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -j BOSUN-FILTER",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -j BOSUN-FILTER",
    ),
];

const NAT_BASE: &[&str] = &[
    "BOSUN-SERVICES",
    "BOSUN-NODEPORTS",
    "BOSUN-POSTROUTING",
    "BOSUN-MARK-MASQ",
];
const FILTER_BASE: &[&str] = &["BOSUN-FILTER", "BOSUN-NODEPORTS"];

fn hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016X}")
}

/// iptables chain names are at most 28 characters: a prefix and a hash.
fn chain(prefix: &str, id: &str) -> String {
    format!("BOSUN-{prefix}-{}", hash(id))
}

/// The two tables' `iptables-restore` input, and the chains it declares.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rendered {
    pub family: Family,
    pub nat_chains: BTreeSet<String>,
    pub filter_chains: BTreeSet<String>,
    pub nat_rules: Vec<String>,
    pub filter_rules: Vec<String>,
}

fn match_dst(ip: &IpAddr, proto: &str, port: u16) -> String {
    let bits = Family::of(ip).host_bits();
    format!("-d {ip}/{bits} -p {proto} -m {proto} --dport {port}")
}

/// Rules in `chain_name` choosing one of `eps` (non-empty).
fn select(sp: &ServicePort, eps: &[Endpoint], chain_name: &str, r: &mut Rendered) {
    let proto = sp.proto.as_str();
    let sep = |e: &Endpoint| chain("SEP", &format!("{}|{}:{}", sp.id, e.ip, e.port));
    for e in eps {
        let c = sep(e);
        if !r.nat_chains.insert(c.clone()) {
            continue; // already filled (the endpoint is also in the other policy's chain)
        }
        r.nat_rules.push(format!(
            "-A {c} -s {}/{} -j BOSUN-MARK-MASQ",
            e.ip,
            Family::of(&e.ip).host_bits()
        ));
        let recent = if sp.affinity_timeout.is_some() {
            format!("-m recent --name {c} --set --rsource ")
        } else {
            String::new()
        };
        r.nat_rules.push(format!(
            "-A {c} -p {proto} {recent}-m {proto} -j DNAT --to-destination {}",
            Family::addr_port(&e.ip, e.port)
        ));
    }
    if let Some(t) = sp.affinity_timeout {
        for e in eps {
            let c = sep(e);
            r.nat_rules.push(format!(
                "-A {chain_name} -m recent --name {c} --rcheck --seconds {t} --reap --rsource -j {c}"
            ));
        }
    }
    let mut left: u64 = eps.iter().map(|e| u64::from(e.weight)).sum();
    for (i, e) in eps.iter().enumerate() {
        let c = sep(e);
        if i + 1 == eps.len() {
            r.nat_rules.push(format!("-A {chain_name} -j {c}"));
        } else {
            let p = f64::from(e.weight) / left as f64;
            r.nat_rules.push(format!(
                "-A {chain_name} -m statistic --mode random --probability {p:.10} -j {c}"
            ));
        }
        left -= u64::from(e.weight);
    }
}

fn render_service(f: Family, sp: &ServicePort, opts: &Options, r: &mut Rendered) {
    let proto = sp.proto.as_str();
    let all = &sp.endpoints;
    let local = sp.local_endpoints();
    let svc = chain("SVC", &sp.id);
    let lcl = chain("LCL", &sp.id);
    let ext = chain("EXT", &sp.id);
    if !all.is_empty() {
        r.nat_chains.insert(svc.clone());
        if let Some(cidr) = opts.cidr(f) {
            for ip in &sp.cluster_ips {
                r.nat_rules.push(format!(
                    "-A {svc} {} ! -s {cidr} -j BOSUN-MARK-MASQ",
                    match_dst(ip, proto, sp.port)
                ));
            }
        }
        select(sp, all, &svc, r);
    }
    let needs_local =
        (sp.internal_local || (sp.external_local && sp.has_external())) && !local.is_empty();
    if needs_local {
        r.nat_chains.insert(lcl.clone());
        select(sp, &local, &lcl, r);
    }
    // (target chain, or the filter verdict when there is none)
    let target = |policy_local: bool| -> Result<String, &'static str> {
        match (policy_local, all.is_empty(), local.is_empty()) {
            (_, true, _) => Err("REJECT"),
            (true, false, true) => Err("DROP"),
            (true, false, false) => Ok(lcl.clone()),
            (false, false, _) => Ok(svc.clone()),
        }
    };
    for ip in &sp.cluster_ips {
        match target(sp.internal_local) {
            Ok(c) => r.nat_rules.push(format!(
                "-A BOSUN-SERVICES {} -j {c}",
                match_dst(ip, proto, sp.port)
            )),
            Err(v) => r.filter_rules.push(format!(
                "-A BOSUN-FILTER {} -j {v}",
                match_dst(ip, proto, sp.port)
            )),
        }
    }
    if sp.has_external() {
        let t = target(sp.external_local);
        if t.is_ok() {
            r.nat_chains.insert(ext.clone());
            if sp.external_local {
                r.nat_rules.push(format!("-A {ext} -j {lcl}"));
            } else {
                r.nat_rules.push(format!("-A {ext} -j BOSUN-MARK-MASQ"));
                r.nat_rules.push(format!("-A {ext} -j {svc}"));
            }
        }
        for ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
            match &t {
                Ok(_) => r.nat_rules.push(format!(
                    "-A BOSUN-SERVICES {} -j {ext}",
                    match_dst(ip, proto, sp.port)
                )),
                Err(v) => r.filter_rules.push(format!(
                    "-A BOSUN-FILTER {} -j {v}",
                    match_dst(ip, proto, sp.port)
                )),
            }
        }
        if let Some(np) = sp.node_port {
            match &t {
                Ok(_) => r.nat_rules.push(format!(
                    "-A BOSUN-NODEPORTS -p {proto} -m {proto} --dport {np} -j {ext}"
                )),
                Err(v) => r.filter_rules.push(format!(
                    "-A BOSUN-NODEPORTS -p {proto} -m {proto} --dport {np} -j {v}"
                )),
            }
        }
    }
    if !sp.source_ranges.is_empty() && !sp.load_balancer_ips.is_empty() {
        let fw = chain("FW", &sp.id);
        r.filter_chains.insert(fw.clone());
        for ip in &sp.load_balancer_ips {
            r.filter_rules.push(format!(
                "-A BOSUN-FILTER -p {proto} -m conntrack --ctorigdst {ip}/{} --ctorigdstport {} -j {fw}",
                f.host_bits(),
                sp.port
            ));
        }
        for range in &sp.source_ranges {
            r.filter_rules.push(format!("-A {fw} -s {range} -j RETURN"));
        }
        r.filter_rules.push(format!("-A {fw} -j DROP"));
    }
}

/// Renders every service port of family `f` (for `iptables-restore` or
/// `ip6tables-restore`).
pub fn render(f: Family, services: &ServiceMap, opts: &Options) -> Rendered {
    let mut r = Rendered {
        family: f,
        ..Default::default()
    };
    for sp in services.values() {
        if let Some(sp) = sp.for_family(f) {
            render_service(f, &sp, opts, &mut r);
        }
    }
    r
}

/// `iptables-restore --noflush` input: declares (and so flushes) every
/// Bosun chain, fills them, and deletes the chains of `previous` that are
/// gone.
pub fn restore_text(r: &Rendered, previous: Option<&Rendered>) -> String {
    let mut out = String::with_capacity(128 * (r.nat_rules.len() + r.filter_rules.len() + 16));
    let empty = Rendered::default();
    let prev = previous.unwrap_or(&empty);
    // filter
    out.push_str("*filter\n");
    let filter: BTreeSet<&str> = FILTER_BASE
        .iter()
        .copied()
        .chain(r.filter_chains.iter().map(String::as_str))
        .collect();
    let stale_filter: Vec<&String> = prev
        .filter_chains
        .iter()
        .filter(|c| !filter.contains(c.as_str()))
        .collect();
    for c in filter
        .iter()
        .copied()
        .chain(stale_filter.iter().map(|c| c.as_str()))
    {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for rule in &r.filter_rules {
        let _ = writeln!(out, "{rule}");
    }
    out.push_str(&format!(
        "-A BOSUN-FILTER -m addrtype --dst-type LOCAL ! -d {} -j BOSUN-NODEPORTS\n",
        r.family.loopback()
    ));
    for c in &stale_filter {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n*nat\n");
    let nat: BTreeSet<&str> = NAT_BASE
        .iter()
        .copied()
        .chain(r.nat_chains.iter().map(String::as_str))
        .collect();
    let stale_nat: Vec<&String> = prev
        .nat_chains
        .iter()
        .filter(|c| !nat.contains(c.as_str()))
        .collect();
    for c in nat
        .iter()
        .copied()
        .chain(stale_nat.iter().map(|c| c.as_str()))
    {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str("-A BOSUN-MARK-MASQ -j MARK --or-mark 0x4000\n");
    out.push_str("-A BOSUN-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A BOSUN-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str("-A BOSUN-POSTROUTING -j MASQUERADE --random-fully\n");
    for rule in &r.nat_rules {
        let _ = writeln!(out, "{rule}");
    }
    out.push_str(&format!(
        "-A BOSUN-SERVICES -m addrtype --dst-type LOCAL ! -d {} -j BOSUN-NODEPORTS\n",
        r.family.loopback()
    ));
    for c in &stale_nat {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
    out
}

/// `iptables-restore --noflush` input that empties and deletes every chain
/// of `r` and the base chains (after the builtin jumps are removed).
pub fn cleanup_text(nat_chains: &[String], filter_chains: &[String]) -> String {
    let mut out = String::from("*filter\n");
    for c in filter_chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for c in filter_chains {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n*nat\n");
    for c in nat_chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for c in nat_chains {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
    out
}
