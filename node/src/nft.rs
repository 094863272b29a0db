//! The nftables backend: what kube-proxy's nftables mode programs, in tables
//! `ip bosun` and `ip6 bosun` (one per address family), as `nft -f` text.
//!
//! Dispatch is one verdict map keyed on `address . protocol . port`
//! (`service-ips`) and one on `protocol . port` for NodePorts
//! (`service-nodeports`, behind `fib daddr type local`). Each service port
//! has a chain choosing an endpoint with `numgen random` by weight; with
//! `sessionAffinity: ClientIP` each endpoint gets its own chain that records
//! the client in a dynamic timeout set.
//!
//! Endpoint choice without affinity is one rule per service port,
//! `dnat to numgen random mod N offset BASE map @endpoints-PROTO-K`: each
//! service port owns a block of slot numbers (BASE…), each endpoint fills
//! as many slots as its weight, and the slots live in one of [`SHARDS`]
//! shared data maps of its protocol. An endpoint that changes (a pod replaced, readiness) is then an
//! element change only: no rule is added, so the kernel does not
//! re-validate the table's whole jump graph (~60-90 ms at 10k services).
//! The maps are sharded because the kernel checks a map's elements against
//! every rule bound to it: one map for all services was O(endpoints ×
//! services) (18 s at 10k), one map per service costs a set each (6 s). Services without endpoints are in
//! `no-endpoint-*` maps, checked in filter hooks, that reject (or drop, for
//! a `Local` policy with no local endpoint).
//!
//! A sync is rendered into named pieces (sets, chains, map elements), so
//! the next sync sends only the pieces that changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::net::IpAddr;
use std::sync::Arc;

use crate::services::{Endpoint, Family, ServiceMap, ServicePort};

pub const TABLE: &str = "bosun";

/// How many endpoint maps (per protocol) the slots are spread over.
pub const SHARDS: u32 = 64;

/// The protocols with endpoint maps of their own: a map's data is typed
/// `ADDR . PROTO dport`, as nft demands of a rule added to an existing
/// chain (a protocol-neutral `th dport` is refused there).
const PROTOS: [&str; 3] = ["tcp", "udp", "sctp"];

/// Slots per block: a service port whose endpoints' weights add up to more
/// falls back to a cascade of `numgen` rules.
pub const BLOCK: u32 = 4096;
/// Node-wide settings that shape the rules.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Pod CIDRs (comma-separated, one per family): cluster-IP traffic from
    /// outside it is masqueraded.
    pub cluster_cidr: Option<String>,
}

impl Options {
    /// The cluster CIDR of family `f`, if given.
    pub fn cidr(&self, f: Family) -> Option<&str> {
        self.cluster_cidr
            .as_deref()?
            .split(',')
            .map(str::trim)
            .find(|c| crate::services::parse_cidr(c).is_some_and(|(a, _)| Family::of(&a) == f))
    }
}

/// One service port's part of the table, by name: what a sync adds,
/// rewrites or removes when that service port changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Piece {
    /// Set name → its declaration body.
    pub sets: BTreeMap<String, String>,
    /// Chain name → its rules.
    pub chains: BTreeMap<String, Vec<String>>,
    /// (map, key) → verdict or data.
    pub elements: BTreeMap<(String, String), String>,
    /// Endpoint IPs: `ip . ip` elements of the shared `hairpin` set.
    pub hairpin: BTreeSet<IpAddr>,
    /// Slot blocks this piece owns: name (`ID`, `ID/local`) → block number.
    pub blocks: BTreeMap<String, u32>,
}

/// The whole table: each service port's piece (kept with the service port
/// it was rendered from, so an unchanged one is not rendered again), and
/// how many pieces want each hairpin element.
#[derive(Clone, Debug, Default)]
pub struct Rendered {
    pub family: Family,
    pub pieces: BTreeMap<String, Arc<(Arc<ServicePort>, Piece)>>,
    pub hairpin: Arc<HashMap<IpAddr, usize>>,
}

/// The table's fixed part: maps, sets and chains every sync keeps.
fn base(f: Family) -> String {
    let (ip, a, lo) = (f.nft(), f.addr_type(), f.loopback());
    format!(
        "  map service-ips {{ type {a} . inet_proto . inet_service : verdict; }}
  map service-nodeports {{ type inet_proto . inet_service : verdict; }}
  map no-endpoint-services {{ type {a} . inet_proto . inet_service : verdict; }}
  map no-endpoint-nodeports {{ type inet_proto . inet_service : verdict; }}
  map firewall-ips {{ type {a} . inet_proto . inet_service : verdict; }}
  set hairpin {{ type {a} . {a}; }}
  chain filter-prerouting {{ type filter hook prerouting priority dstnat - 10; policy accept; ct state new jump firewall-check; }}
  chain filter-input {{ type filter hook input priority -110; policy accept; ct state new jump endpoints-check; }}
  chain filter-forward {{ type filter hook forward priority -110; policy accept; ct state new jump endpoints-check; }}
  chain filter-output {{ type filter hook output priority -110; policy accept; ct state new jump firewall-check; ct state new jump endpoints-check; }}
  chain firewall-check {{ {ip} daddr . meta l4proto . th dport vmap @firewall-ips; }}
  chain endpoints-check {{ {ip} daddr . meta l4proto . th dport vmap @no-endpoint-services; fib daddr type local {ip} daddr != {lo} meta l4proto . th dport vmap @no-endpoint-nodeports; }}
  chain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump services; }}
  chain nat-output {{ type nat hook output priority -100; policy accept; jump services; }}
  chain nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump masquerading; }}
  chain services {{ {ip} daddr . meta l4proto . th dport vmap @service-ips; fib daddr type local {ip} daddr != {lo} meta l4proto . th dport vmap @service-nodeports; }}
  chain mark-for-masquerade {{ meta mark set meta mark or 0x4000; }}
  chain masquerading {{ ct status dnat {ip} saddr . {ip} daddr @hairpin masquerade; meta mark & 0x4000 == 0 return; meta mark set meta mark xor 0x4000; masquerade fully-random; }}
  chain reject-chain {{ reject; }}
{}",
        PROTOS
            .iter()
            .flat_map(|p| (0..SHARDS).map(move |k| (p, k)))
            .map(|(p, k)| format!(
                "  map endpoints-{p}-{k} {{ typeof numgen random mod 1 : {ip} daddr . {p} dport; }}\n"
            ))
            .collect::<String>()
    )
}

/// Hands out slot blocks: a name keeps the block it had in the previous
/// rendering; a new name gets the lowest block no piece of the previous
/// rendering held (so a block freed in this sync is reused only by a later
/// one, never in the transaction that empties it).
struct Blocks<'a> {
    prev: Option<&'a Rendered>,
    /// Every block of `prev`, gathered when a new name first needs one.
    taken: Option<BTreeSet<u32>>,
    next: u32,
}

impl<'a> Blocks<'a> {
    fn new(prev: Option<&'a Rendered>) -> Blocks<'a> {
        Blocks {
            prev,
            taken: None,
            next: 0,
        }
    }

    /// The block of `name`, the piece of service port `id`.
    fn get(&mut self, id: &str, name: &str) -> u32 {
        let prev = self.prev;
        if let Some(b) = prev
            .and_then(|p| p.pieces.get(id))
            .and_then(|p| p.1.blocks.get(name))
        {
            return *b;
        }
        let taken = self.taken.get_or_insert_with(|| {
            prev.into_iter()
                .flat_map(|r| r.pieces.values())
                .flat_map(|p| p.1.blocks.values().copied())
                .collect()
        });
        while taken.contains(&self.next) {
            self.next += 1;
        }
        let b = self.next;
        taken.insert(b);
        b
    }
}

/// An endpoint in a chain or set name (no `:`, which names cannot hold).
fn ep_key(e: &Endpoint) -> String {
    format!("{}_{}", e.ip, e.port).replace(':', ".")
}

fn dnat(proto: &str, e: &Endpoint) -> String {
    format!(
        "meta l4proto {proto} dnat to {}",
        Family::addr_port(&e.ip, e.port)
    )
}

/// Rules that pick one of `eps` (non-empty) for a new connection, by
/// weight: `numgen random mod LEFT < W` per endpoint, the last one taking
/// what is left (the same cascade as iptables' `statistic`). Plain rules
/// rather than an anonymous `numgen` map per service: the kernel names
/// anonymous sets by scanning every set of the table, which makes a full
/// sync quadratic in the number of services (41 s instead of ~3 s at 10k).
fn select(
    f: Family,
    sp: &ServicePort,
    eps: &[Endpoint],
    r: &mut Piece,
    block: (&str, &mut Blocks),
) -> Vec<String> {
    let (proto, ip) = (sp.proto.as_str(), f.nft());
    let mut rules = Vec::new();
    let mut left: u64 = eps.iter().map(|e| u64::from(e.weight)).sum();
    if sp.affinity_timeout.is_none() && left <= u64::from(BLOCK) {
        // Slots in a shared map: endpoint changes are element changes.
        let (name, blocks) = block;
        let b = blocks.get(&sp.id, name);
        r.blocks.insert(name.to_string(), b);
        let (base, map) = (b * BLOCK, format!("endpoints-{proto}-{}", b % SHARDS));
        let mut slot = base;
        for e in eps {
            for _ in 0..e.weight {
                r.elements.insert(
                    (map.clone(), slot.to_string()),
                    format!("{} . {}", e.ip, e.port),
                );
                slot += 1;
            }
        }
        rules.push(format!(
            "meta l4proto {proto} dnat {ip} to numgen random mod {left} offset {base} map @{map}"
        ));
        return rules;
    }
    let mut pick = |rules: &mut Vec<String>, e: &Endpoint, action: String, last: bool| {
        if last {
            rules.push(action);
        } else {
            rules.push(format!("numgen random mod {left} < {} {action}", e.weight));
        }
        left -= u64::from(e.weight);
    };
    if let Some(timeout) = sp.affinity_timeout {
        let ep_chain = |e: &Endpoint| format!("ep-{}-{}", sp.id, ep_key(e));
        // The timeout is in the name: a new timeout is a new set.
        let set = |e: &Endpoint| format!("aff-{}-{}-{timeout}", sp.id, ep_key(e));
        for e in eps {
            r.sets.insert(
                set(e),
                format!(
                    "type {}; flags dynamic,timeout; timeout {timeout}s;",
                    f.addr_type()
                ),
            );
            r.chains.insert(
                ep_chain(e),
                vec![
                    format!("update @{} {{ {ip} saddr }}", set(e)),
                    dnat(proto, e),
                ],
            );
            rules.push(format!("{ip} saddr @{} goto {}", set(e), ep_chain(e)));
        }
        for (i, e) in eps.iter().enumerate() {
            pick(
                &mut rules,
                e,
                format!("goto {}", ep_chain(e)),
                i + 1 == eps.len(),
            );
        }
    } else {
        for (i, e) in eps.iter().enumerate() {
            pick(&mut rules, e, dnat(proto, e), i + 1 == eps.len());
        }
    }
    rules
}

fn render_service(f: Family, sp: &ServicePort, opts: &Options, r: &mut Piece, blocks: &mut Blocks) {
    let (proto, ipf) = (sp.proto.as_str(), f.nft());
    let all = &sp.endpoints;
    let local = sp.local_endpoints();
    let svc_chain = format!("svc-{}", sp.id);
    let local_chain = format!("local-{}", sp.id);
    let ext_chain = format!("ext-{}", sp.id);
    if !all.is_empty() {
        let mut rules = Vec::new();
        if let Some(cidr) = opts.cidr(f) {
            for ip in &sp.cluster_ips {
                rules.push(format!(
                    "{ipf} daddr {ip} {ipf} saddr != {cidr} jump mark-for-masquerade"
                ));
            }
        }
        rules.extend(select(f, sp, all, r, (&sp.id, blocks)));
        r.chains.insert(svc_chain.clone(), rules);
        for e in all {
            r.hairpin.insert(e.ip);
        }
    }
    let needs_local =
        (sp.internal_local || (sp.external_local && sp.has_external())) && !local.is_empty();
    if needs_local {
        let rules = select(f, sp, &local, r, (&format!("{}/local", sp.id), blocks));
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
    // `addr . proto . port` → verdict, in the dispatch map or, without
    // endpoints to go to, in the one the filter hooks check.
    let address = |r: &mut Piece, ip: &IpAddr, ok: bool, v: &str| {
        let map = if ok {
            "service-ips"
        } else {
            "no-endpoint-services"
        };
        r.elements.insert(
            (map.to_string(), format!("{ip} . {proto} . {}", sp.port)),
            v.to_string(),
        );
    };
    let (ok, v) = verdict(sp.internal_local);
    for ip in &sp.cluster_ips {
        address(r, ip, ok, &v);
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
            address(r, ip, ok, &v);
        }
        if let Some(np) = sp.node_port {
            let map = if ok {
                "service-nodeports"
            } else {
                "no-endpoint-nodeports"
            };
            r.elements
                .insert((map.to_string(), format!("{proto} . {np}")), v);
        }
    }
    if !sp.source_ranges.is_empty() && !sp.load_balancer_ips.is_empty() {
        let fw = format!("fw-{}", sp.id);
        let mut rules: Vec<String> = sp
            .source_ranges
            .iter()
            .map(|range| format!("{ipf} saddr {range} return"))
            .collect();
        rules.push("drop".into());
        r.chains.insert(fw.clone(), rules);
        for ip in &sp.load_balancer_ips {
            r.elements.insert(
                (
                    "firewall-ips".to_string(),
                    format!("{ip} . {proto} . {}", sp.port),
                ),
                format!("goto {fw}"),
            );
        }
    }
}

/// Renders every service port; pieces of `prev` whose service port did not
/// change are reused as they are.
pub fn render(
    f: Family,
    services: &ServiceMap,
    opts: &Options,
    prev: Option<&Rendered>,
) -> Rendered {
    let no_pieces = BTreeMap::new();
    let prev_pieces = prev.map_or(&no_pieces, |p| &p.pieces);
    // Hairpin counts are shared with `prev` until a piece's endpoint
    // addresses change (an endpoint's port changing copies nothing).
    let mut hairpin = prev.map(|p| p.hairpin.clone()).unwrap_or_default();
    let mut count = |ips: &BTreeSet<IpAddr>, up: bool| {
        if ips.is_empty() {
            return;
        }
        let h = Arc::make_mut(&mut hairpin);
        for ip in ips {
            if up {
                *h.entry(*ip).or_default() += 1;
            } else if let Some(n) = h.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    h.remove(ip);
                }
            }
        }
    };
    let mut blocks = Blocks::new(prev);
    let mut pieces = Vec::with_capacity(services.len());
    // Both maps are sorted by id: walk them side by side.
    let mut olds = prev_pieces.iter().peekable();
    for (id, services_sp) in services {
        let sp = services_sp;
        while let Some((_, gone)) = olds.next_if(|(oid, _)| oid.as_str() < id.as_str()) {
            count(&gone.1.hairpin, false);
        }
        let old = olds.next_if(|(oid, _)| *oid == id).map(|(_, o)| o);
        // Single-family services (the usual case) compare without a copy.
        // Unchanged (the same Arc, as a source that keeps them passes it,
        // or equal): the piece is reused, not rendered again.
        if let Some(old) = old
            && (Arc::ptr_eq(&old.0, sp) || *old.0 == **sp)
        {
            pieces.push((id.clone(), old.clone()));
            continue;
        }
        let Some(sp) = sp.for_family(f) else {
            if let Some(old) = old {
                count(&old.1.hairpin, false);
            }
            continue;
        };
        if let Some(old) = old
            && *old.0 == sp
        {
            pieces.push((id.clone(), old.clone()));
            continue;
        }
        let mut piece = Piece::default();
        render_service(f, &sp, opts, &mut piece, &mut blocks);
        match old {
            Some(old) => {
                let (o, n) = (&old.1.hairpin, &piece.hairpin);
                count(&n.difference(o).copied().collect(), true);
                count(&o.difference(n).copied().collect(), false);
            }
            None => count(&piece.hairpin, true),
        }
        // Single-family: keep the caller's Arc, for `ptr_eq` next time.
        let sp = if sp == **services_sp {
            services_sp.clone()
        } else {
            Arc::new(sp)
        };
        pieces.push((id.clone(), Arc::new((sp, piece))));
    }
    for (_, gone) in olds {
        count(&gone.1.hairpin, false);
    }
    Rendered {
        family: f,
        pieces: pieces.into_iter().collect(),
        hairpin,
    }
}

/// Appends `add element` (or `delete element`) commands, one per map.
fn elements<'a>(
    out: &mut String,
    f: Family,
    verb: &str,
    items: impl Iterator<Item = (&'a str, &'a str, &'a str)>,
) {
    let mut by_map: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (map, key, value) in items {
        let e = if value.is_empty() || verb == "delete" {
            key.to_string()
        } else {
            format!("{key} : {value}")
        };
        by_map.entry(map).or_default().push(e);
    }
    for (map, es) in by_map {
        // Bounded lines: nft reads a huge single line slowly.
        for chunk in es.chunks(4096) {
            let _ = writeln!(
                out,
                "{verb} element {} {TABLE} {map} {{ {} }}",
                f.nft(),
                chunk.join(", ")
            );
        }
    }
}

/// A whole-table transaction: the table is replaced atomically (dynamic
/// affinity entries are lost, as in kube-proxy's full resync).
pub fn full_text(r: &Rendered) -> String {
    let f = r.family;
    let fam = f.nft();
    let mut out = String::with_capacity(256 + r.pieces.len() * 1200);
    let _ = writeln!(out, "add table {fam} {TABLE}");
    let _ = writeln!(out, "delete table {fam} {TABLE}");
    let _ = writeln!(
        out,
        "table {fam} {TABLE} {{\n  comment \"Bosun node mode: Service load balancing\";\n{}",
        base(f)
    );
    for p in r.pieces.values() {
        for (name, body) in &p.1.sets {
            let _ = writeln!(out, "  set {name} {{ {body} }}");
        }
    }
    for p in r.pieces.values() {
        for name in p.1.chains.keys() {
            let _ = writeln!(out, "  chain {name} {{ }}");
        }
    }
    for p in r.pieces.values() {
        for (name, rules) in &p.1.chains {
            let _ = writeln!(out, "  chain {name} {{");
            for rule in rules {
                let _ = writeln!(out, "    {rule}");
            }
            let _ = writeln!(out, "  }}");
        }
    }
    let _ = writeln!(out, "}}");
    let mut hairpin: Vec<String> = r.hairpin.keys().map(|ip| format!("{ip} . {ip}")).collect();
    hairpin.sort();
    elements(
        &mut out,
        f,
        "add",
        r.pieces
            .values()
            .flat_map(|p| {
                p.1.elements
                    .iter()
                    .map(|((m, k), v)| (m.as_str(), k.as_str(), v.as_str()))
            })
            .chain(hairpin.iter().map(|h| ("hairpin", h.as_str(), ""))),
    );
    out
}

/// Elements of `a` that `b` lacks or maps elsewhere: (map, key, value).
fn only_in<'p>(a: &'p Piece, b: &'p Piece) -> impl Iterator<Item = (&'p str, &'p str, &'p str)> {
    a.elements
        .iter()
        .filter(move |(k, v)| b.elements.get(*k) != Some(*v))
        .map(|((m, k), v)| (m.as_str(), k.as_str(), v.as_str()))
}

/// What differs between two renderings: the pieces that changed (old,
/// new; an empty piece for one that came or went), and the hairpin
/// elements to remove and to add.
struct Changes<'a> {
    changed: Vec<(&'a Piece, &'a Piece)>,
    hairpin_del: Vec<IpAddr>,
    hairpin_add: Vec<IpAddr>,
}

static EMPTY: std::sync::LazyLock<Piece> = std::sync::LazyLock::new(Piece::default);

fn changes<'a>(old: &'a Rendered, new: &'a Rendered) -> Option<Changes<'a>> {
    let empty: &Piece = &EMPTY;
    let mut changed: Vec<(&Piece, &Piece)> = Vec::new();
    // Both sorted by id: walk them side by side.
    let mut olds = old.pieces.iter().peekable();
    for (id, n) in &new.pieces {
        while let Some((_, gone)) = olds.next_if(|(oid, _)| oid.as_str() < id.as_str()) {
            changed.push((&gone.1, empty));
        }
        match olds.next_if(|(oid, _)| *oid == id) {
            Some((_, o)) if Arc::ptr_eq(o, n) || o.1 == n.1 => {}
            Some((_, o)) => changed.push((&o.1, &n.1)),
            None => changed.push((empty, &n.1)),
        }
    }
    for (_, gone) in olds {
        changed.push((&gone.1, empty));
    }
    // Only endpoints of changed pieces can have come or gone.
    let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
    for (o, n) in &changed {
        touched.extend(o.hairpin.symmetric_difference(&n.hairpin));
    }
    let hairpin_del: Vec<IpAddr> = touched
        .iter()
        .filter(|h| old.hairpin.contains_key(*h) && !new.hairpin.contains_key(*h))
        .copied()
        .collect();
    let hairpin_add: Vec<IpAddr> = touched
        .iter()
        .filter(|h| !old.hairpin.contains_key(*h) && new.hairpin.contains_key(*h))
        .copied()
        .collect();
    if changed.is_empty() && hairpin_del.is_empty() && hairpin_add.is_empty() {
        return None;
    }
    Some(Changes {
        changed,
        hairpin_del,
        hairpin_add,
    })
}

/// The change from `old` to `new` as set elements only (an endpoint
/// replaced: slots of the `endpoints-*` maps and hairpin elements), for
/// [`crate::netlink`] (empty when nothing changed); `None` when rules,
/// chains, sets or verdict maps change too.
pub fn diff_elements(old: &Rendered, new: &Rendered) -> Option<Vec<crate::netlink::Element>> {
    use crate::netlink::{Element, value};
    let Some(c) = changes(old, new) else {
        return Some(Vec::new());
    };
    let ipv6 = new.family == Family::V6;
    let element = |set: &str, add: bool, key: Vec<u8>, data: Option<Vec<u8>>| Element {
        ipv6,
        table: TABLE.to_string(),
        set: set.to_string(),
        add,
        key,
        data,
    };
    // `SLOT` : `ADDR . PORT` in an endpoints map.
    let slot = |map: &str, key: &str, v: &str, add: bool| -> Option<Element> {
        if !map.starts_with("endpoints-") {
            return None;
        }
        let mut k = Vec::new();
        value::host_u32(key.parse().ok()?, &mut k);
        let (ip, port) = v.split_once(" . ")?;
        let mut d = Vec::new();
        value::addr(&ip.parse().ok()?, &mut d);
        value::port(port.parse().ok()?, &mut d);
        Some(element(map, add, k, add.then_some(d)))
    };
    let hairpin = |ip: &IpAddr, add: bool| {
        let mut k = Vec::new();
        value::addr(ip, &mut k);
        value::addr(ip, &mut k);
        element("hairpin", add, k, None)
    };
    let mut out = Vec::new();
    for (o, n) in &c.changed {
        if o.sets != n.sets || o.chains != n.chains {
            return None;
        }
    }
    for (o, n) in &c.changed {
        for (m, k, v) in only_in(o, n) {
            out.push(slot(m, k, v, false)?);
        }
    }
    out.extend(c.hairpin_del.iter().map(|ip| hairpin(ip, false)));
    for (o, n) in &c.changed {
        for (m, k, v) in only_in(n, o) {
            out.push(slot(m, k, v, true)?);
        }
    }
    out.extend(c.hairpin_add.iter().map(|ip| hairpin(ip, true)));
    Some(out)
}

/// The transaction that turns `old` into `new`, touching only the service
/// ports that changed; `None` when nothing did.
pub fn diff_text(old: &Rendered, new: &Rendered) -> Option<String> {
    let Changes {
        changed,
        hairpin_del,
        hairpin_add,
    } = changes(old, new)?;
    let hairpin_del: Vec<String> = hairpin_del
        .iter()
        .map(|ip| format!("{ip} . {ip}"))
        .collect();
    let hairpin_add: Vec<String> = hairpin_add
        .iter()
        .map(|ip| format!("{ip} . {ip}"))
        .collect();
    let f = new.family;
    let fam = f.nft();
    let mut out = String::new();
    // New sets, then new chains (so rules may refer to them).
    for (o, n) in &changed {
        for (name, body) in &n.sets {
            if !o.sets.contains_key(name) {
                let _ = writeln!(out, "add set {fam} {TABLE} {name} {{ {body} }}");
            }
        }
    }
    for (o, n) in &changed {
        for name in n.chains.keys() {
            if !o.chains.contains_key(name) {
                let _ = writeln!(out, "add chain {fam} {TABLE} {name}");
            }
        }
    }
    for (o, n) in &changed {
        for (name, rules) in &n.chains {
            match o.chains.get(name) {
                Some(r) if r == rules => continue,
                Some(_) => {
                    let _ = writeln!(out, "flush chain {fam} {TABLE} {name}");
                }
                None => {}
            }
            for rule in rules {
                let _ = writeln!(out, "add rule {fam} {TABLE} {name} {rule}");
            }
        }
    }
    elements(
        &mut out,
        f,
        "delete",
        changed
            .iter()
            .flat_map(|(o, n)| only_in(o, n))
            .chain(hairpin_del.iter().map(|h| ("hairpin", h.as_str(), ""))),
    );
    elements(
        &mut out,
        f,
        "add",
        changed
            .iter()
            .flat_map(|(o, n)| only_in(n, o))
            .chain(hairpin_add.iter().map(|h| ("hairpin", h.as_str(), ""))),
    );
    // Stale chains: emptied first (they may refer to each other), then gone.
    let stale: Vec<&String> = changed
        .iter()
        .flat_map(|(o, n)| o.chains.keys().filter(|c| !n.chains.contains_key(*c)))
        .collect();
    for name in &stale {
        let _ = writeln!(out, "flush chain {fam} {TABLE} {name}");
    }
    for name in &stale {
        let _ = writeln!(out, "delete chain {fam} {TABLE} {name}");
    }
    for (o, n) in &changed {
        for name in o.sets.keys() {
            if !n.sets.contains_key(name) {
                let _ = writeln!(out, "delete set {fam} {TABLE} {name}");
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Removes everything node mode programmed.
pub fn cleanup_text() -> String {
    format!(
        "add table ip {TABLE}\ndelete table ip {TABLE}\nadd table ip6 {TABLE}\ndelete table ip6 {TABLE}\n"
    )
}
