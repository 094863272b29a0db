//! The nftables backend: what kube-proxy's nftables mode programs, in tables
//! `ip bosun` and `ip6 bosun` (one per address family). Every sync is one
//! nf_tables transaction sent over netlink ([`full_batch`], [`diff_batch`]);
//! the same transaction renders as `nft -f` text ([`full_text`],
//! [`diff_text`]) for the golden files, and for a kernel that refuses
//! Bosun's encoding.
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
//! shared data maps of its protocol. An endpoint replaced (a pod moved) is
//! then an element change only: no rule is added, so the kernel does not
//! re-validate the table's whole jump graph (~10 ms at 10k services).
//! Endpoints that go keep the rule too ([`Split::KeepRules`]: their slots
//! go to the endpoints left) until an exact rendering evens the split out.
//! The maps are sharded because the kernel checks each element added to a
//! map against every rule bound to it: one map for all services was
//! O(endpoints × services) (18 s at 10k), one map per service costs a set
//! each (6 s); 256 shards took a 10k full sync from 0.8 to 0.65 s and a
//! 30k one from 4 to 2.6 s. Services without endpoints are in
//! `no-endpoint-*` maps, checked in filter hooks, that reject (or drop, for
//! a `Local` policy with no local endpoint).
//!
//! A sync is rendered into named pieces (sets, chains, map elements), so
//! the next sync sends only the pieces that changed.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::net::IpAddr;
use std::sync::Arc;

use crate::netlink::{Batch, ElemCode, Hook, SetSpec, expr::Exprs, value};
use crate::rule::{Cidr, DispatchKey, Rule, Stmt, Verdict};
use crate::services::{Endpoint, Family, Proto, ServiceMap, ServicePort};

pub const TABLE: &str = "bosun";

/// How many endpoint maps (per protocol) the slots are spread over.
pub const SHARDS: u32 = 256;

/// The protocols with endpoint maps of their own: a map's data is typed
/// `ADDR . PROTO dport`, as nft demands of a rule added to an existing
/// chain (a protocol-neutral `th dport` is refused there).
const PROTOS: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

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
    /// Affinity set name → its timeout (seconds).
    pub sets: BTreeMap<String, u32>,
    /// Chain name → its rules.
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// (map, key) → verdict or data.
    pub elements: BTreeMap<(&'static str, Key), Value>,
    /// Endpoint IPs: `ip . ip` elements of the shared `hairpin` set.
    pub hairpin: BTreeSet<IpAddr>,
    /// Slot blocks this piece owns: name (`ID`, `ID/local`) → block number.
    pub blocks: BTreeMap<String, u32>,
    /// Block name → the slot count its rule draws from (`numgen mod N`).
    pub moduli: BTreeMap<String, u32>,
    /// Some block draws from more slots than its endpoints' weights add up
    /// to (endpoints went, the rule was kept): the split is uneven until
    /// an exact rendering.
    pub skewed: bool,
}

/// A service port and the piece rendered from it.
pub type Rendition = Arc<(Arc<ServicePort>, Piece)>;

/// The whole table: each service port's piece (kept with the service port
/// it was rendered from, so an unchanged one is not rendered again), and
/// how many pieces want each hairpin element.
#[derive(Clone, Debug, Default)]
pub struct Rendered {
    pub family: Family,
    /// Sorted by id.
    pub pieces: Vec<(Arc<str>, Rendition)>,
    pub hairpin: Arc<HashMap<IpAddr, usize>>,
    /// Hairpin elements this rendering added and removed, against the
    /// one it was rendered from (what a diff between the two sends).
    pub hairpin_added: Vec<IpAddr>,
    pub hairpin_removed: Vec<IpAddr>,
}

impl Rendered {
    /// The piece of service port `id`.
    pub fn piece(&self, id: &str) -> Option<&Rendition> {
        let i = self.pieces.binary_search_by(|(k, _)| (**k).cmp(id)).ok()?;
        Some(&self.pieces[i].1)
    }

    /// Whether some service port's split is uneven (see [`Split`]).
    pub fn skewed(&self) -> bool {
        self.pieces.iter().any(|(_, p)| p.1.skewed)
    }
}

/// The name of endpoint map `shard` of protocol `p`.
fn endpoints_map(p: Proto, shard: u32) -> &'static str {
    static NAMES: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        PROTOS
            .iter()
            .flat_map(|p| (0..SHARDS).map(move |k| format!("endpoints-{}-{k}", p.as_str())))
            .collect()
    });
    let i = PROTOS.iter().position(|x| *x == p).unwrap_or(0) * SHARDS as usize + shard as usize;
    NAMES.get(i).map_or("endpoints-tcp-0", String::as_str)
}

/// A map element's key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// `ADDR . PROTO . PORT`: a service address.
    Service(IpAddr, Proto, u16),
    /// `PROTO . PORT`: a NodePort.
    NodePort(Proto, u16),
    /// An endpoint slot (`numgen` value).
    Slot(u32),
    /// `ADDR . ADDR` (the hairpin set).
    Pair(IpAddr),
}

/// What a map element maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Verdict(Verdict),
    /// `ADDR . PORT`
    Endpoint(IpAddr, u16),
}

impl Key {
    fn text(&self) -> String {
        match self {
            Key::Service(ip, p, port) => format!("{ip} . {} . {port}", p.as_str()),
            Key::NodePort(p, port) => format!("{} . {port}", p.as_str()),
            Key::Slot(n) => n.to_string(),
            Key::Pair(ip) => format!("{ip} . {ip}"),
        }
    }
    fn encode(&self, k: &mut Vec<u8>) {
        match self {
            Key::Service(ip, p, port) => {
                value::addr(ip, k);
                k.extend_from_slice(&[crate::rule::proto_number(*p), 0, 0, 0]);
                value::port(*port, k);
            }
            Key::NodePort(p, port) => {
                k.extend_from_slice(&[crate::rule::proto_number(*p), 0, 0, 0]);
                value::port(*port, k);
            }
            Key::Slot(n) => value::host_u32(*n, k),
            Key::Pair(ip) => {
                value::addr(ip, k);
                value::addr(ip, k);
            }
        }
    }
}

impl Value {
    fn text(&self) -> String {
        match self {
            Value::Verdict(v) => v.text(),
            Value::Endpoint(ip, port) => format!("{ip} . {port}"),
        }
    }
}

/// nft's datatype numbers.
const TYPE_INTEGER: u32 = 4;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_VERDICT: u32 = 0xffff_ff00;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;

fn addr_type(f: Family) -> u32 {
    match f {
        Family::V4 => 7,
        Family::V6 => 8,
    }
}

fn addr_len(f: Family) -> u32 {
    match f {
        Family::V4 => 4,
        Family::V6 => 16,
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// The annotations nft 1.0.6 attaches to each kind of set (byte orders,
/// `typeof` expressions), copied so `nft list` reads our sets as its own.
mod udata {
    /// A verdict map keyed on a concatenation.
    pub const VMAP: &str = "000400000000010400000000030800040d0000000100060400000000";
    /// `type ADDR . ADDR`
    pub const PAIR: &str = "000400000000030800040d0000000100";
    /// `type ADDR; flags dynamic,timeout`
    pub const ADDR: &str = "000402000000";
    /// `typeof numgen random mod 1 : ADDR daddr . PROTO dport`, in parts.
    pub const SLOTS: &str = "000401000000010400000000031a0004170000000112000401000000010401000000020400000000043400040d000000012c0014000407000000010c0004";
    pub const SLOTS_V4: &str = "0c00000001040c000000";
    pub const SLOTS_V6: &str = "0d000000010409000000";
    pub const SLOTS_MID: &str = "0114000407000000010c0004";
    pub const SLOTS_END: &str = "010402000000060400000000";
}

/// A map or set of the table's fixed part.
struct BaseSet {
    name: String,
    /// Its declaration body in nft text.
    text: String,
    spec: SetSpec,
}

/// The fixed part of a family's table, built once.
struct Base {
    sets: Vec<BaseSet>,
    chains: Vec<(&'static str, Option<Hook>, Vec<Rule>)>,
}

fn base(f: Family) -> &'static Base {
    static BASE: std::sync::LazyLock<[Base; 2]> = std::sync::LazyLock::new(|| {
        [Family::V4, Family::V6].map(|f| Base {
            sets: base_sets(f),
            chains: base_chains(f),
        })
    });
    &BASE[f as usize]
}

fn base_sets(f: Family) -> Vec<BaseSet> {
    let (a, at, al) = (f.addr_type(), addr_type(f), addr_len(f));
    let service = (at << 12) | (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE;
    let nodeport = (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE;
    let vmap = |name: &str, key_type: u32, key_len: u32, text: String| BaseSet {
        name: name.to_string(),
        text,
        spec: SetSpec {
            flags: NFT_SET_MAP,
            key_type,
            key_len,
            data: Some((TYPE_VERDICT, 0)),
            timeout_ms: None,
            udata: hex(udata::VMAP),
        },
    };
    let mut fixed = vec![
        vmap(
            "service-ips",
            service,
            al + 8,
            format!("type {a} . inet_proto . inet_service : verdict;"),
        ),
        vmap(
            "service-nodeports",
            nodeport,
            8,
            "type inet_proto . inet_service : verdict;".into(),
        ),
        vmap(
            "no-endpoint-services",
            service,
            al + 8,
            format!("type {a} . inet_proto . inet_service : verdict;"),
        ),
        vmap(
            "no-endpoint-nodeports",
            nodeport,
            8,
            "type inet_proto . inet_service : verdict;".into(),
        ),
        vmap(
            "firewall-ips",
            service,
            al + 8,
            format!("type {a} . inet_proto . inet_service : verdict;"),
        ),
        BaseSet {
            name: "hairpin".into(),
            text: format!("type {a} . {a};"),
            spec: SetSpec {
                flags: 0,
                key_type: (at << 6) | at,
                key_len: 2 * al,
                data: None,
                timeout_ms: None,
                udata: hex(udata::PAIR),
            },
        },
    ];
    // The endpoint maps first: the kernel finds a set by name by walking
    // the table's sets in order, once per rule that looks one up.
    let mut sets = Vec::new();
    let ip = f.nft();
    for p in PROTOS {
        let mut ud = hex(udata::SLOTS);
        ud.extend(hex(match f {
            Family::V4 => udata::SLOTS_V4,
            Family::V6 => udata::SLOTS_V6,
        }));
        ud.extend(hex(udata::SLOTS_MID));
        // nft's protocol description numbers.
        ud.extend_from_slice(&[
            match p {
                Proto::Tcp => 8,
                Proto::Udp => 6,
                Proto::Sctp => 10,
            },
            0,
            0,
            0,
        ]);
        ud.extend(hex(udata::SLOTS_END));
        for k in 0..SHARDS {
            sets.push(BaseSet {
                name: format!("endpoints-{}-{k}", p.as_str()),
                text: format!(
                    "typeof numgen random mod 1 : {ip} daddr . {} dport;",
                    p.as_str()
                ),
                spec: SetSpec {
                    flags: NFT_SET_MAP,
                    key_type: TYPE_INTEGER,
                    key_len: 4,
                    data: Some(((at << 6) | TYPE_INET_SERVICE, al + 4)),
                    timeout_ms: None,
                    udata: ud.clone(),
                },
            });
        }
    }
    sets.append(&mut fixed);
    sets
}

/// An affinity set: client addresses, each remembered for `timeout` s.
fn affinity_set(f: Family, timeout: u32) -> (String, SetSpec) {
    (
        format!(
            "type {}; flags dynamic,timeout; timeout {timeout}s;",
            f.addr_type()
        ),
        SetSpec {
            flags: NFT_SET_TIMEOUT | NFT_SET_EVAL,
            key_type: addr_type(f),
            key_len: addr_len(f),
            data: None,
            timeout_ms: Some(u64::from(timeout) * 1000),
            udata: hex(udata::ADDR),
        },
    )
}

const MASQ_BIT: u32 = 0x4000;

/// The table's fixed chains: name, hook, rules.
fn base_chains(_f: Family) -> Vec<(&'static str, Option<Hook>, Vec<Rule>)> {
    use Stmt::*;
    let hook = |kind, num, priority| {
        Some(Hook {
            kind,
            num,
            priority,
        })
    };
    let jump = |c: &str| Stmt::Verdict(crate::rule::Verdict::Jump(c.into()));
    let new_jump = |c: &str| Rule::new([CtStateNew, jump(c)]);
    let nodeports = |m: &str| {
        Rule::new([
            FibDaddrLocal,
            DaddrNotLoopback,
            Vmap(DispatchKey::ProtoPort, m.into()),
        ])
    };
    vec![
        (
            "filter-prerouting",
            hook("filter", 0, -110),
            vec![new_jump("firewall-check")],
        ),
        (
            "filter-input",
            hook("filter", 1, -110),
            vec![new_jump("endpoints-check")],
        ),
        (
            "filter-forward",
            hook("filter", 2, -110),
            vec![new_jump("endpoints-check")],
        ),
        (
            "filter-output",
            hook("filter", 3, -110),
            vec![new_jump("firewall-check"), new_jump("endpoints-check")],
        ),
        (
            "firewall-check",
            None,
            vec![Rule::new([Vmap(
                DispatchKey::AddrProtoPort,
                "firewall-ips".into(),
            )])],
        ),
        (
            "endpoints-check",
            None,
            vec![
                Rule::new([Vmap(
                    DispatchKey::AddrProtoPort,
                    "no-endpoint-services".into(),
                )]),
                nodeports("no-endpoint-nodeports"),
            ],
        ),
        (
            "nat-prerouting",
            hook("nat", 0, -100),
            vec![Rule::new([jump("services")])],
        ),
        (
            "nat-output",
            hook("nat", 3, -100),
            vec![Rule::new([jump("services")])],
        ),
        (
            "nat-postrouting",
            hook("nat", 4, 100),
            vec![Rule::new([jump("masquerading")])],
        ),
        (
            "services",
            None,
            vec![
                Rule::new([Vmap(DispatchKey::AddrProtoPort, "service-ips".into())]),
                nodeports("service-nodeports"),
            ],
        ),
        (
            "mark-for-masquerade",
            None,
            vec![Rule::new([MarkOr(MASQ_BIT)])],
        ),
        (
            "masquerading",
            None,
            vec![
                Rule::new([
                    CtStatusDnat,
                    PairIn("hairpin".into()),
                    Masquerade {
                        fully_random: false,
                    },
                ]),
                Rule::new([
                    MarkClear(MASQ_BIT),
                    Stmt::Verdict(crate::rule::Verdict::Return),
                ]),
                Rule::new([MarkXor(MASQ_BIT)]),
                Rule::new([Masquerade { fully_random: true }]),
            ],
        ),
        ("reject-chain", None, vec![Rule::new([Reject])]),
    ]
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
            .and_then(|p| p.piece(id))
            .and_then(|p| p.1.blocks.get(name))
        {
            return *b;
        }
        let taken = self.taken.get_or_insert_with(|| {
            prev.into_iter()
                .flat_map(|r| r.pieces.iter().map(|(_, p)| p))
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

fn dnat(proto: Proto, e: &Endpoint) -> Vec<Stmt> {
    vec![Stmt::L4Proto(proto), Stmt::Dnat(e.ip, e.port)]
}

/// Which endpoint each of `m` slots goes to: each endpoint's share is its
/// weight's part of `m` (largest remainders round up; endpoints not in
/// `olds` first, so one that came gets a slot), and a slot keeps the
/// endpoint it had in `olds` while that one is under its share (fewer
/// elements change). With `m` the weights' sum this is exact.
fn share_slots<'e>(
    eps: &'e [Endpoint],
    m: u64,
    olds: &[Option<(IpAddr, u16)>],
) -> Vec<&'e Endpoint> {
    let total: u64 = eps.iter().map(|e| u64::from(e.weight)).sum::<u64>().max(1);
    if olds.is_empty() && m == total {
        // Fresh and exact (a full sync): each endpoint's slots in turn.
        return eps
            .iter()
            .flat_map(|e| std::iter::repeat_n(e, e.weight as usize))
            .collect();
    }
    let index: HashMap<(IpAddr, u16), usize> = eps
        .iter()
        .enumerate()
        .map(|(i, e)| ((e.ip, e.port), i))
        .collect();
    let had: BTreeSet<usize> = olds
        .iter()
        .flatten()
        .filter_map(|k| index.get(k).copied())
        .collect();
    let mut quota: Vec<u64> = eps
        .iter()
        .map(|e| u64::from(e.weight) * m / total)
        .collect();
    let mut order: Vec<usize> = (0..eps.len()).collect();
    order.sort_by_key(|&i| {
        let rem = u64::from(eps[i].weight) * m % total;
        (std::cmp::Reverse(rem), had.contains(&i), i)
    });
    let short = m - quota.iter().sum::<u64>();
    for &i in order.iter().take(short as usize) {
        quota[i] += 1;
    }
    let mut used = vec![0u64; eps.len()];
    let mut owner: Vec<Option<usize>> = (0..m as usize)
        .map(|s| {
            let i = *index.get(olds.get(s).copied().flatten().as_ref()?)?;
            (used[i] < quota[i]).then(|| {
                used[i] += 1;
                i
            })
        })
        .collect();
    let mut next = 0;
    for o in owner.iter_mut().filter(|o| o.is_none()) {
        while next < eps.len() && used[next] >= quota[next] {
            next += 1;
        }
        if next < eps.len() {
            used[next] += 1;
            *o = Some(next);
        }
    }
    owner.into_iter().map(|o| &eps[o.unwrap_or(0)]).collect()
}

/// Rules that pick one of `eps` (non-empty) for a new connection, by
/// weight: `numgen random mod LEFT < W` per endpoint, the last one taking
/// what is left (the same cascade as iptables' `statistic`). Plain rules
/// rather than an anonymous `numgen` map per service: the kernel names
/// anonymous sets by scanning every set of the table, which makes a full
/// sync quadratic in the number of services (41 s instead of ~3 s at 10k).
fn select(
    sp: &ServicePort,
    eps: &[Endpoint],
    r: &mut Piece,
    block: (&str, &mut Blocks),
    prev: Option<(&Piece, bool)>,
) -> Vec<Rule> {
    let proto = sp.proto;
    let mut rules = Vec::new();
    let mut left: u64 = eps.iter().map(|e| u64::from(e.weight)).sum();
    if sp.affinity_timeout.is_none() && left <= u64::from(BLOCK) {
        // Slots in a shared map: endpoint changes are element changes.
        let (name, blocks) = block;
        let b = blocks.get(&sp.id, name);
        r.blocks.insert(name.to_string(), b);
        let (base, map) = (b * BLOCK, endpoints_map(proto, b % SHARDS));
        let old = prev.and_then(|(p, keep)| {
            let m = *p.moduli.get(name)?;
            let slots: Vec<Option<(IpAddr, u16)>> = (0..m)
                .map(|i| match p.elements.get(&(map, Key::Slot(base + i))) {
                    Some(Value::Endpoint(ip, port)) => Some((*ip, *port)),
                    _ => None,
                })
                .collect();
            Some((m, slots, keep))
        });
        // Endpoints came or went and the rule is kept (see `Split`): its
        // slot count stays, shared out by weight as evenly as it divides.
        let modulus = match &old {
            Some((m, _, true)) => u64::from(*m),
            _ => left,
        };
        let olds = old.as_ref().map_or(&[][..], |(_, s, _)| &s[..]);
        let owners = share_slots(eps, modulus, olds);
        for (i, e) in owners.iter().enumerate() {
            r.elements.insert(
                (map, Key::Slot(base + i as u32)),
                Value::Endpoint(e.ip, e.port),
            );
        }
        r.skewed |= modulus != left;
        r.moduli.insert(name.to_string(), modulus as u32);
        rules.push(Rule::new([
            Stmt::L4Proto(proto),
            Stmt::DnatMap {
                modulus: modulus as u32,
                offset: base,
                map: map.to_string(),
            },
        ]));
        return rules;
    }
    let mut pick = |rules: &mut Vec<Rule>, e: &Endpoint, action: Vec<Stmt>, last: bool| {
        if last {
            rules.push(Rule(action));
        } else {
            let mut stmts = vec![Stmt::NumgenLt {
                modulus: left as u32,
                lt: e.weight,
            }];
            stmts.extend(action);
            rules.push(Rule(stmts));
        }
        left -= u64::from(e.weight);
    };
    if let Some(timeout) = sp.affinity_timeout {
        let ep_chain = |e: &Endpoint| format!("ep-{}-{}", sp.id, ep_key(e));
        // The timeout is in the name: a new timeout is a new set.
        let set = |e: &Endpoint| format!("aff-{}-{}-{timeout}", sp.id, ep_key(e));
        for e in eps {
            r.sets.insert(set(e), timeout);
            r.chains.insert(
                ep_chain(e),
                vec![Rule::new([Stmt::UpdateSaddr(set(e))]), Rule(dnat(proto, e))],
            );
            rules.push(Rule::new([
                Stmt::SaddrIn(set(e)),
                Stmt::Verdict(Verdict::Goto(ep_chain(e))),
            ]));
        }
        for (i, e) in eps.iter().enumerate() {
            pick(
                &mut rules,
                e,
                vec![Stmt::Verdict(Verdict::Goto(ep_chain(e)))],
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

/// Renders one service port into `r`. `prev`: the previous rendering's
/// piece (its slots are kept where they can be), and whether its slot
/// counts are kept too (endpoints only came or went, see [`Split`]).
fn render_service(
    f: Family,
    sp: &ServicePort,
    opts: &Options,
    r: &mut Piece,
    blocks: &mut Blocks,
    prev: Option<(&Piece, bool)>,
) {
    let proto = sp.proto;
    let all = &sp.endpoints;
    let local = sp.local_endpoints();
    let svc_chain = format!("svc-{}", sp.id);
    let local_chain = format!("local-{}", sp.id);
    let ext_chain = format!("ext-{}", sp.id);
    if !all.is_empty() {
        let mut rules = Vec::new();
        if let Some(cidr) = opts.cidr(f).and_then(Cidr::parse) {
            for ip in &sp.cluster_ips {
                rules.push(Rule::new([
                    Stmt::Daddr(*ip),
                    Stmt::Saddr {
                        cidr: cidr.clone(),
                        not: true,
                    },
                    Stmt::Verdict(Verdict::Jump("mark-for-masquerade".into())),
                ]));
            }
        }
        rules.extend(select(sp, all, r, (&sp.id, blocks), prev));
        r.chains.insert(svc_chain.clone(), rules);
        for e in all {
            r.hairpin.insert(e.ip);
        }
    }
    let needs_local =
        (sp.internal_local || (sp.external_local && sp.has_external())) && !local.is_empty();
    if needs_local {
        let name = format!("{}/local", sp.id);
        let rules = select(sp, &local, r, (&name, blocks), prev);
        r.chains.insert(local_chain.clone(), rules);
    }
    // What a connection to each address of this service port does.
    let verdict = |policy_local: bool| -> (bool, Verdict) {
        match (policy_local, all.is_empty(), local.is_empty()) {
            (_, true, _) => (false, Verdict::Goto("reject-chain".into())),
            (true, false, true) => (false, Verdict::Drop),
            (true, false, false) => (true, Verdict::Goto(local_chain.clone())),
            (false, false, _) => (true, Verdict::Goto(svc_chain.clone())),
        }
    };
    // `addr . proto . port` → verdict, in the dispatch map or, without
    // endpoints to go to, in the one the filter hooks check.
    let address = |r: &mut Piece, ip: &IpAddr, ok: bool, v: &Verdict| {
        let map = if ok {
            "service-ips"
        } else {
            "no-endpoint-services"
        };
        r.elements.insert(
            (map, Key::Service(*ip, proto, sp.port)),
            Value::Verdict(v.clone()),
        );
    };
    let (ok, v) = verdict(sp.internal_local);
    for ip in &sp.cluster_ips {
        address(r, ip, ok, &v);
    }
    if sp.has_external() {
        let (ok, v) = verdict(sp.external_local);
        let v = if ok {
            let go = |c: &str| Rule::new([Stmt::Verdict(Verdict::Goto(c.to_string()))]);
            let rules = if sp.external_local {
                vec![go(&local_chain)]
            } else {
                vec![
                    Rule::new([Stmt::Verdict(Verdict::Jump("mark-for-masquerade".into()))]),
                    go(&svc_chain),
                ]
            };
            r.chains.insert(ext_chain.clone(), rules);
            Verdict::Goto(ext_chain.clone())
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
                .insert((map, Key::NodePort(proto, np)), Value::Verdict(v));
        }
    }
    if !sp.source_ranges.is_empty() && !sp.load_balancer_ips.is_empty() {
        let fw = format!("fw-{}", sp.id);
        let mut rules: Vec<Rule> = sp
            .source_ranges
            .iter()
            .filter_map(|range| Cidr::parse(range))
            .map(|cidr| {
                Rule::new([
                    Stmt::Saddr { cidr, not: false },
                    Stmt::Verdict(Verdict::Return),
                ])
            })
            .collect();
        rules.push(Rule::new([Stmt::Verdict(Verdict::Drop)]));
        r.chains.insert(fw.clone(), rules);
        for ip in &sp.load_balancer_ips {
            r.elements.insert(
                ("firewall-ips", Key::Service(*ip, proto, sp.port)),
                Value::Verdict(Verdict::Goto(fw.clone())),
            );
        }
    }
}

/// How a rendering treats endpoints that went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Each service port's rule draws from exactly its endpoints' slots.
    Exact,
    /// A service port whose endpoints only came or went keeps its rule
    /// and slot count, shared out among the endpoints it has now by weight,
    /// as evenly as the count divides (an endpoint that came takes a slot;
    /// for a while some get one more or one less than their share). The
    /// change is then map elements only, which the kernel applies in
    /// ~1 ms, where a rule change makes it re-validate the whole table
    /// (~10 ms at 10k services). An `Exact` rendering follows to even the
    /// split out.
    KeepRules,
}

/// Whether `sp` has addresses of family `f` and nothing of another (so
/// `sp.for_family(f)` would be `sp` again).
fn only_family(sp: &ServicePort, f: Family) -> bool {
    let ips = || {
        sp.cluster_ips
            .iter()
            .chain(&sp.external_ips)
            .chain(&sp.load_balancer_ips)
    };
    ips().next().is_some()
        && ips().all(|ip| Family::of(ip) == f)
        && sp.endpoints.iter().all(|e| Family::of(&e.ip) == f)
        && sp
            .source_ranges
            .iter()
            .all(|r| crate::services::parse_cidr(r).is_some_and(|(a, _)| Family::of(&a) == f))
}

/// Whether `new` is `old` with endpoints that came or went and nothing
/// else changed: no other field, and no endpoint kept with another weight
/// or locality (a canary shift is always exact).
fn only_endpoints_changed(old: &ServicePort, new: &ServicePort) -> bool {
    if old.endpoints == new.endpoints {
        return false;
    }
    let olds: HashMap<(IpAddr, u16), &Endpoint> =
        old.endpoints.iter().map(|e| ((e.ip, e.port), e)).collect();
    new.endpoints
        .iter()
        .all(|e| olds.get(&(e.ip, e.port)).is_none_or(|o| *o == e))
        && ServicePort {
            endpoints: Vec::new(),
            ..new.clone()
        } == ServicePort {
            endpoints: Vec::new(),
            ..old.clone()
        }
}

/// Renders every service port; pieces of `prev` whose service port did not
/// change are reused as they are (unless uneven and `split` is `Exact`).
pub fn render(
    f: Family,
    services: &ServiceMap,
    opts: &Options,
    prev: Option<&Rendered>,
    split: Split,
) -> Rendered {
    let hairpin = prev.map(|p| p.hairpin.clone()).unwrap_or_default();
    render_from(f, services, opts, prev, hairpin, split)
}

/// [`render`], taking `prev`'s hairpin counts rather than sharing them (a
/// change to them then copies nothing; `prev` is left without them, fit
/// only for a diff to the result).
pub fn render_taking(
    f: Family,
    services: &ServiceMap,
    opts: &Options,
    prev: &mut Rendered,
    split: Split,
) -> Rendered {
    let hairpin = std::mem::take(&mut prev.hairpin);
    render_from(f, services, opts, Some(prev), hairpin, split)
}

fn render_from(
    f: Family,
    services: &ServiceMap,
    opts: &Options,
    prev: Option<&Rendered>,
    mut hairpin: Arc<HashMap<IpAddr, usize>>,
    split: Split,
) -> Rendered {
    let prev_pieces = prev.map_or(&[][..], |p| &p.pieces[..]);
    // Hairpin counts are shared with `prev` (unless taken) until a piece's
    // endpoint addresses change (an endpoint's port changing copies nothing).
    // Elements that came (+1) or went (-1).
    let mut moved: HashMap<IpAddr, i32> = HashMap::new();
    let mut count = |ips: &BTreeSet<IpAddr>, up: bool| {
        if ips.is_empty() {
            return;
        }
        let h = Arc::make_mut(&mut hairpin);
        for ip in ips {
            if up {
                let n = h.entry(*ip).or_default();
                *n += 1;
                if *n == 1 {
                    *moved.entry(*ip).or_default() += 1;
                }
            } else if let Some(n) = h.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    h.remove(ip);
                    *moved.entry(*ip).or_default() -= 1;
                }
            }
        }
    };
    let mut blocks = Blocks::new(prev);
    let mut pieces = Vec::with_capacity(services.len());
    // Both maps are sorted by id: walk them side by side.
    let mut olds = prev_pieces.iter().map(|(k, v)| (k, v)).peekable();
    for (id, services_sp) in services {
        let sp = services_sp;
        // The same service port (the same Arc, as a source that keeps
        // them passes it) is the same id: no string compared.
        let same = olds.peek().is_some_and(|(_, o)| Arc::ptr_eq(&o.0, sp));
        if !same {
            while let Some((_, gone)) = olds.next_if(|(oid, _)| &***oid < id.as_str()) {
                count(&gone.1.hairpin, false);
            }
        }
        // The id is shared with the last rendering's (no copy per sync).
        let (key, old) = match olds.next_if(|(oid, _)| same || &***oid == id.as_str()) {
            Some((k, o)) => (k.clone(), Some(o)),
            None => (Arc::from(id.as_str()), None),
        };
        // Single-family services (the usual case) compare without a copy.
        // Unchanged (the same Arc, as a source that keeps them passes it,
        // or equal): the piece is reused, not rendered again.
        let reuse = |old: &Rendition| !(old.1.skewed && split == Split::Exact);
        if let Some(old) = old
            && (Arc::ptr_eq(&old.0, sp) || *old.0 == **sp)
            && reuse(old)
        {
            pieces.push((key, old.clone()));
            continue;
        }
        // A service of this family only (the usual case) is used as it is.
        let sp: Cow<ServicePort> = if only_family(sp, f) {
            Cow::Borrowed(&**sp)
        } else if let Some(sp) = sp.for_family(f) {
            Cow::Owned(sp)
        } else {
            if let Some(old) = old {
                count(&old.1.hairpin, false);
            }
            // Nothing in this family: an empty piece, so the next rendering
            // knows it by pointer without looking into the service again.
            pieces.push((key, Arc::new((services_sp.clone(), Piece::default()))));
            continue;
        };
        if let Some(old) = old
            && *old.0 == *sp
            && reuse(old)
        {
            pieces.push((key, old.clone()));
            continue;
        }
        let mut piece = Piece::default();
        let prev = old.map(|o| {
            let keep = split == Split::KeepRules && only_endpoints_changed(&o.0, &sp);
            (&o.1, keep)
        });
        render_service(f, &sp, opts, &mut piece, &mut blocks, prev);
        match old {
            Some(old) => {
                let (o, n) = (&old.1.hairpin, &piece.hairpin);
                count(&n.difference(o).copied().collect(), true);
                count(&o.difference(n).copied().collect(), false);
            }
            None => count(&piece.hairpin, true),
        }
        // Single-family: keep the caller's Arc, for `ptr_eq` next time.
        let sp = match sp {
            Cow::Borrowed(_) => services_sp.clone(),
            Cow::Owned(sp) => Arc::new(sp),
        };
        pieces.push((key, Arc::new((sp, piece))));
    }
    for (_, gone) in olds {
        count(&gone.1.hairpin, false);
    }
    let mut hairpin_added: Vec<IpAddr> = moved
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(ip, _)| *ip)
        .collect();
    let mut hairpin_removed: Vec<IpAddr> = moved
        .iter()
        .filter(|(_, n)| **n < 0)
        .map(|(ip, _)| *ip)
        .collect();
    hairpin_added.sort();
    hairpin_removed.sort();
    Rendered {
        family: f,
        pieces,
        hairpin,
        hairpin_added,
        hairpin_removed,
    }
}

const COMMENT: &str = "Bosun node mode: Service load balancing";

/// One element of a map or set: (map, key, value when adding to a map).
type Elem<'a> = (&'a str, Cow<'a, Key>, Option<&'a Value>);

/// One step of a transaction, rendered as `nft` text or as netlink.
enum Op<'a> {
    /// The table gone, whether it was there or not (added, then deleted).
    DropTable,
    /// An empty table (after `DropTable`: the old one replaced atomically).
    Table,
    Set {
        name: &'a str,
        text: Cow<'a, str>,
        spec: Cow<'a, SetSpec>,
    },
    Chain(&'a str, Option<Hook>),
    Flush(&'a str),
    Rule(&'a str, &'a Rule),
    Elements {
        add: bool,
        items: Vec<Elem<'a>>,
    },
    DelChain(&'a str),
    DelSet(&'a str),
}

fn affinity_op(f: Family, name: &str, timeout: u32) -> Op<'_> {
    let (text, spec) = affinity_set(f, timeout);
    Op::Set {
        name,
        text: Cow::Owned(text),
        spec: Cow::Owned(spec),
    }
}

fn piece_elements(p: &Piece) -> impl Iterator<Item = Elem<'_>> {
    p.elements
        .iter()
        .map(|((m, k), v)| (*m, Cow::Borrowed(k), Some(v)))
}

/// The whole-table transaction: the table is replaced atomically
/// (dynamic affinity entries are lost, as in kube-proxy's full resync).
fn full_ops(r: &Rendered) -> Vec<Op<'_>> {
    let f = r.family;
    let base = base(f);
    let mut ops = vec![Op::DropTable, Op::Table];
    for s in &base.sets {
        ops.push(Op::Set {
            name: &s.name,
            text: Cow::Borrowed(&s.text),
            spec: Cow::Borrowed(&s.spec),
        });
    }
    for (_, p) in &r.pieces {
        for (name, t) in &p.1.sets {
            ops.push(affinity_op(f, name, *t));
        }
    }
    for (name, hook, _) in &base.chains {
        ops.push(Op::Chain(name, *hook));
    }
    for (_, p) in &r.pieces {
        for name in p.1.chains.keys() {
            ops.push(Op::Chain(name, None));
        }
    }
    for (name, _, rules) in &base.chains {
        for rule in rules {
            ops.push(Op::Rule(name, rule));
        }
    }
    for (_, p) in &r.pieces {
        for (name, rules) in &p.1.chains {
            for rule in rules {
                ops.push(Op::Rule(name, rule));
            }
        }
    }
    let mut hairpin: Vec<&IpAddr> = r.hairpin.keys().collect();
    hairpin.sort();
    ops.push(Op::Elements {
        add: true,
        items: r
            .pieces
            .iter()
            .map(|(_, p)| p)
            .flat_map(|p| piece_elements(&p.1))
            .chain(
                hairpin
                    .into_iter()
                    .map(|ip| ("hairpin", Cow::Owned(Key::Pair(*ip)), None)),
            )
            .collect(),
    });
    ops
}

/// Elements of `a` that `b` lacks or maps elsewhere.
fn only_in<'p>(a: &'p Piece, b: &'p Piece) -> impl Iterator<Item = Elem<'p>> {
    a.elements
        .iter()
        .filter(move |(k, v)| b.elements.get(*k) != Some(*v))
        .map(|((m, k), v)| (*m, Cow::Borrowed(k), Some(v)))
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

/// `new` must have been rendered from `old`.
fn changes<'a>(old: &'a Rendered, new: &'a Rendered) -> Option<Changes<'a>> {
    let empty: &Piece = &EMPTY;
    let mut changed: Vec<(&Piece, &Piece)> = Vec::new();
    // Both sorted by id: walk them side by side.
    let mut olds = old.pieces.iter().map(|(k, v)| (k, v)).peekable();
    for (id, n) in &new.pieces {
        // Ids are shared between renderings: compared by pointer first.
        let same = olds.peek().is_some_and(|(oid, _)| Arc::ptr_eq(oid, id));
        if !same {
            while let Some((_, gone)) = olds.next_if(|(oid, _)| oid < &id) {
                changed.push((&gone.1, empty));
            }
        }
        match olds.next_if(|(oid, _)| same || *oid == id) {
            Some((_, o)) if Arc::ptr_eq(o, n) || o.1 == n.1 => {}
            Some((_, o)) => changed.push((&o.1, &n.1)),
            None => changed.push((empty, &n.1)),
        }
    }
    for (_, gone) in olds {
        changed.push((&gone.1, empty));
    }
    // What `new` counted while rendered from `old`.
    let hairpin_del = new.hairpin_removed.clone();
    let hairpin_add = new.hairpin_added.clone();
    if changed.is_empty() && hairpin_del.is_empty() && hairpin_add.is_empty() {
        return None;
    }
    Some(Changes {
        changed,
        hairpin_del,
        hairpin_add,
    })
}

/// The transaction that turns `old` into `new`, touching only the service
/// ports that changed; `None` when nothing did. An endpoint replaced is
/// map elements only: no rule is added, so the kernel does not
/// re-validate the table.
fn diff_ops<'a>(old: &'a Rendered, new: &'a Rendered) -> Option<Vec<Op<'a>>> {
    let Changes {
        changed,
        hairpin_del,
        hairpin_add,
    } = changes(old, new)?;
    let f = new.family;
    let mut ops = Vec::new();
    // New sets, then new chains (so rules may refer to them).
    for (o, n) in &changed {
        for (name, t) in &n.sets {
            if !o.sets.contains_key(name) {
                ops.push(affinity_op(f, name, *t));
            }
        }
    }
    for (o, n) in &changed {
        for name in n.chains.keys() {
            if !o.chains.contains_key(name) {
                ops.push(Op::Chain(name, None));
            }
        }
    }
    for (o, n) in &changed {
        for (name, rules) in &n.chains {
            match o.chains.get(name) {
                Some(r) if r == rules => continue,
                Some(_) => ops.push(Op::Flush(name)),
                None => {}
            }
            for rule in rules {
                ops.push(Op::Rule(name, rule));
            }
        }
    }
    // Removals first (a slot's old value goes before its new one).
    for (add, hairpin) in [(false, &hairpin_del), (true, &hairpin_add)] {
        let items: Vec<Elem> = changed
            .iter()
            .flat_map(|(o, n)| if add { only_in(n, o) } else { only_in(o, n) })
            .chain(
                hairpin
                    .iter()
                    .map(|ip| ("hairpin", Cow::Owned(Key::Pair(*ip)), None)),
            )
            .collect();
        if !items.is_empty() {
            ops.push(Op::Elements { add, items });
        }
    }
    // Stale chains: emptied first (they may refer to each other), then gone.
    let stale: Vec<&String> = changed
        .iter()
        .flat_map(|(o, n)| o.chains.keys().filter(|c| !n.chains.contains_key(*c)))
        .collect();
    for name in &stale {
        ops.push(Op::Flush(name));
    }
    for name in stale {
        ops.push(Op::DelChain(name));
    }
    for (o, n) in &changed {
        for name in o.sets.keys() {
            if !n.sets.contains_key(name) {
                ops.push(Op::DelSet(name));
            }
        }
    }
    (!ops.is_empty()).then_some(ops)
}

/// `ops` as `nft -f` text.
fn ops_text(f: Family, ops: &[Op]) -> String {
    let fam = f.nft();
    let t = format!("{fam} {TABLE}");
    let mut out = String::new();
    for op in ops {
        let _ = match op {
            Op::DropTable => writeln!(out, "add table {t}\ndelete table {t}"),
            Op::Table => writeln!(out, "add table {t} {{ comment \"{COMMENT}\"; }}"),
            Op::Set { name, text, spec } => {
                let kind = if spec.data.is_some() { "map" } else { "set" };
                writeln!(out, "add {kind} {t} {name} {{ {text} }}")
            }
            Op::Chain(name, None) => writeln!(out, "add chain {t} {name}"),
            Op::Chain(name, Some(h)) => {
                let hook = ["prerouting", "input", "forward", "output", "postrouting"]
                    .get(h.num as usize)
                    .copied()
                    .unwrap_or("prerouting");
                writeln!(
                    out,
                    "add chain {t} {name} {{ type {} hook {hook} priority {}; policy accept; }}",
                    h.kind, h.priority
                )
            }
            Op::Flush(name) => writeln!(out, "flush chain {t} {name}"),
            Op::Rule(chain, rule) => writeln!(out, "add rule {t} {chain} {}", rule.text(f)),
            Op::Elements { add, items } => {
                let verb = if *add { "add" } else { "delete" };
                let mut by_map: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                for (map, key, value) in items {
                    let e = match value {
                        Some(v) if *add => format!("{} : {}", key.text(), v.text()),
                        _ => key.text(),
                    };
                    by_map.entry(map).or_default().push(e);
                }
                for (map, es) in by_map {
                    // Bounded lines: nft reads a huge single line slowly.
                    for chunk in es.chunks(4096) {
                        let _ =
                            writeln!(out, "{verb} element {t} {map} {{ {} }}", chunk.join(", "));
                    }
                }
                Ok(())
            }
            Op::DelChain(name) => writeln!(out, "delete chain {t} {name}"),
            Op::DelSet(name) => writeln!(out, "delete set {t} {name}"),
        };
    }
    out
}

/// A map element as the kernel takes it.
struct Coded<'a>(&'a Key, Option<&'a Value>);

impl ElemCode for Coded<'_> {
    fn key(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
    }
    fn has_data(&self) -> bool {
        self.1.is_some()
    }
    fn data(&self, out: &mut Vec<u8>) {
        match self.1 {
            Some(Value::Verdict(v)) => {
                let (code, chain) = v.code();
                crate::netlink::verdict(out, code, chain);
            }
            Some(Value::Endpoint(ip, port)) => {
                crate::netlink::attr_with(out, crate::netlink::NFTA_DATA_VALUE, |d| {
                    value::addr(ip, d);
                    value::port(*port, d);
                });
            }
            None => {}
        }
    }
}

/// `ops` as netlink messages, appended to `b`.
fn ops_batch(f: Family, ops: &[Op], b: &mut Batch) {
    for op in ops {
        match op {
            Op::DropTable => {
                b.add_table(f, TABLE, None);
                b.del_table(f, TABLE);
            }
            Op::Table => b.add_table(f, TABLE, Some(COMMENT)),
            Op::Set { name, spec, .. } => b.add_set(f, TABLE, name, spec),
            Op::Chain(name, hook) => b.add_chain(f, TABLE, name, *hook),
            Op::Flush(name) => b.flush_chain(f, TABLE, name),
            Op::Rule(chain, rule) => {
                let mut e = Exprs::default();
                rule.encode(f, &mut e);
                b.add_rule(f, TABLE, chain, &e);
            }
            Op::Elements { add, items } => {
                // Grouped by map, in the order maps first appear.
                let mut groups: Vec<(&str, Vec<Coded>)> = Vec::new();
                let mut index: HashMap<&str, usize> = HashMap::new();
                for (map, key, value) in items {
                    let i = *index.entry(map).or_insert_with(|| {
                        groups.push((map, Vec::new()));
                        groups.len() - 1
                    });
                    groups[i]
                        .1
                        .push(Coded(key, if *add { *value } else { None }));
                }
                for (map, elems) in &groups {
                    b.set_elements(f, TABLE, map, *add, elems);
                }
            }
            Op::DelChain(name) => b.del_chain(f, TABLE, name),
            Op::DelSet(name) => b.del_set(f, TABLE, name),
        }
    }
}

/// The whole table as `nft -f` text.
pub fn full_text(r: &Rendered) -> String {
    ops_text(r.family, &full_ops(r))
}

/// The whole table as netlink messages, appended to `b`.
pub fn full_batch(r: &Rendered, b: &mut Batch) {
    ops_batch(r.family, &full_ops(r), b);
}

/// The change from `old` to `new` as `nft -f` text; `None` when nothing
/// changed.
pub fn diff_text(old: &Rendered, new: &Rendered) -> Option<String> {
    Some(ops_text(new.family, &diff_ops(old, new)?))
}

/// The change from `old` to `new` as netlink messages, appended to `b`;
/// false when nothing changed.
pub fn diff_batch(old: &Rendered, new: &Rendered, b: &mut Batch) -> bool {
    match diff_ops(old, new) {
        Some(ops) => {
            ops_batch(new.family, &ops, b);
            true
        }
        None => false,
    }
}

/// Removes everything node mode programmed.
pub fn cleanup_text() -> String {
    [Family::V4, Family::V6]
        .map(|f| ops_text(f, &[Op::DropTable]))
        .concat()
}

/// Removes everything node mode programmed, as netlink messages.
pub fn cleanup_batch(b: &mut Batch) {
    for f in [Family::V4, Family::V6] {
        ops_batch(f, &[Op::DropTable], b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(k: u8, weight: u32) -> Endpoint {
        Endpoint {
            ip: IpAddr::from([10, 1, k, 2]),
            port: 8080,
            local: true,
            node: String::new(),
            weight,
        }
    }

    fn counts(owners: &[&Endpoint]) -> BTreeMap<u8, usize> {
        let mut c = BTreeMap::new();
        for e in owners {
            if let IpAddr::V4(a) = e.ip {
                *c.entry(a.octets()[2]).or_default() += 1;
            }
        }
        c
    }

    #[test]
    fn slots_are_shared_by_weight_and_keep_their_endpoint() {
        // Exact: as many slots as the weights add up to.
        let eps = [ep(1, 3), ep(2, 1)];
        let owners = share_slots(&eps, 4, &[]);
        assert_eq!(counts(&owners), BTreeMap::from([(1, 3), (2, 1)]));
        let olds: Vec<Option<(IpAddr, u16)>> =
            owners.iter().map(|e| Some((e.ip, e.port))).collect();

        // One of ten gone, ten slots kept: one endpoint gets two, and
        // every slot of an endpoint still there keeps it.
        let ten: Vec<Endpoint> = (1..=10).map(|k| ep(k, 1)).collect();
        let before = share_slots(&ten, 10, &[]);
        let olds10: Vec<Option<(IpAddr, u16)>> =
            before.iter().map(|e| Some((e.ip, e.port))).collect();
        let nine: Vec<Endpoint> = ten.iter().filter(|e| e.ip != ten[4].ip).cloned().collect();
        let after = share_slots(&nine, 10, &olds10);
        let c = counts(&after);
        assert_eq!(c.len(), 9);
        assert_eq!(c.values().filter(|n| **n == 2).count(), 1, "{c:?}");
        for (a, b) in before.iter().zip(&after) {
            if a.ip != ten[4].ip {
                assert_eq!(a.ip, b.ip, "a slot changed hands needlessly");
            }
        }

        // One came, the slot count kept: the newcomer gets a slot at once.
        let three = [ep(1, 3), ep(2, 1), ep(3, 1)];
        let grown = share_slots(&three, 4, &olds);
        let c = counts(&grown);
        assert_eq!(c.get(&3), Some(&1), "{c:?}");
        assert_eq!(c.values().sum::<usize>(), 4);
    }
}
