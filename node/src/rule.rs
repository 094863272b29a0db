//! The nftables rules node mode writes, as data: each statement renders as
//! `nft` text (golden files, `nft -f`) and encodes as the kernel's
//! expressions (a netlink batch, [`crate::netlink`]), from one definition.
//!
//! Encodings follow what `nft` 1.0.6 sends for the same text (registers,
//! byte orders, prefix matches), so `nft list` shows a table programmed
//! either way identically; the node e2e suite checks that.

use std::fmt::Write;
use std::net::IpAddr;

use crate::netlink::expr::{self, Exprs};
use crate::services::{Family, Proto};

/// A verdict ending a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Jump(String),
    Goto(String),
    Return,
    Drop,
}

impl Verdict {
    pub fn text(&self) -> String {
        match self {
            Verdict::Jump(c) => format!("jump {c}"),
            Verdict::Goto(c) => format!("goto {c}"),
            Verdict::Return => "return".into(),
            Verdict::Drop => "drop".into(),
        }
    }
    /// (kernel verdict code, chain).
    pub fn code(&self) -> (i32, Option<&str>) {
        match self {
            Verdict::Jump(c) => (expr::NFT_JUMP, Some(c)),
            Verdict::Goto(c) => (expr::NFT_GOTO, Some(c)),
            Verdict::Return => (expr::NFT_RETURN, None),
            Verdict::Drop => (expr::NF_DROP, None),
        }
    }
}

/// An address prefix as written in the config (kept for the text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub text: String,
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = crate::services::parse_cidr(s)?;
        Some(Cidr {
            text: s.to_string(),
            addr,
            prefix,
        })
    }
}

/// What a dispatch map is keyed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DispatchKey {
    /// `ADDR daddr . meta l4proto . th dport`
    AddrProtoPort,
    /// `meta l4proto . th dport`
    ProtoPort,
}

/// One statement of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stmt {
    /// `ct state new`
    CtStateNew,
    /// `ct status dnat`
    CtStatusDnat,
    /// `fib daddr type local`
    FibDaddrLocal,
    /// `ADDR daddr != LOOPBACK`
    DaddrNotLoopback,
    /// `ADDR daddr A`
    Daddr(IpAddr),
    /// `ADDR saddr [!=] CIDR`
    Saddr {
        cidr: Cidr,
        not: bool,
    },
    /// `ADDR saddr @SET`
    SaddrIn(String),
    /// `ADDR saddr . ADDR daddr @SET`
    PairIn(String),
    /// `meta l4proto P`
    L4Proto(Proto),
    /// `numgen random mod M < N`
    NumgenLt {
        modulus: u32,
        lt: u32,
    },
    /// `meta mark & BIT == 0`
    MarkClear(u32),
    /// `meta mark set meta mark or BIT`
    MarkOr(u32),
    /// `meta mark set meta mark xor BIT`
    MarkXor(u32),
    /// `update @SET { ADDR saddr }`
    UpdateSaddr(String),
    /// `KEY vmap @MAP`
    Vmap(DispatchKey, String),
    /// `dnat to ADDR:PORT`
    Dnat(IpAddr, u16),
    /// `dnat ADDR to numgen random mod M offset O map @MAP`
    DnatMap {
        modulus: u32,
        offset: u32,
        map: String,
    },
    /// `masquerade [fully-random]`
    Masquerade {
        fully_random: bool,
    },
    /// `reject`
    Reject,
    Verdict(Verdict),
}

/// A rule: statements in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule(pub Vec<Stmt>);

impl Rule {
    pub fn new(stmts: impl IntoIterator<Item = Stmt>) -> Rule {
        Rule(stmts.into_iter().collect())
    }

    /// The `nft` text of this rule in family `f`.
    pub fn text(&self, f: Family) -> String {
        let ip = f.nft();
        let mut out = String::new();
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            let _ = match s {
                Stmt::CtStateNew => write!(out, "ct state new"),
                Stmt::CtStatusDnat => write!(out, "ct status dnat"),
                Stmt::FibDaddrLocal => write!(out, "fib daddr type local"),
                Stmt::DaddrNotLoopback => write!(out, "{ip} daddr != {}", f.loopback()),
                Stmt::Daddr(a) => write!(out, "{ip} daddr {a}"),
                Stmt::Saddr { cidr, not } => {
                    write!(
                        out,
                        "{ip} saddr {}{}",
                        if *not { "!= " } else { "" },
                        cidr.text
                    )
                }
                Stmt::SaddrIn(set) => write!(out, "{ip} saddr @{set}"),
                Stmt::PairIn(set) => write!(out, "{ip} saddr . {ip} daddr @{set}"),
                Stmt::L4Proto(p) => write!(out, "meta l4proto {}", p.as_str()),
                Stmt::NumgenLt { modulus, lt } => write!(out, "numgen random mod {modulus} < {lt}"),
                Stmt::MarkClear(bit) => write!(out, "meta mark & {bit:#x} == 0"),
                Stmt::MarkOr(bit) => write!(out, "meta mark set meta mark or {bit:#x}"),
                Stmt::MarkXor(bit) => write!(out, "meta mark set meta mark xor {bit:#x}"),
                Stmt::UpdateSaddr(set) => write!(out, "update @{set} {{ {ip} saddr }}"),
                Stmt::Vmap(DispatchKey::AddrProtoPort, m) => {
                    write!(out, "{ip} daddr . meta l4proto . th dport vmap @{m}")
                }
                Stmt::Vmap(DispatchKey::ProtoPort, m) => {
                    write!(out, "meta l4proto . th dport vmap @{m}")
                }
                Stmt::Dnat(a, port) => write!(out, "dnat to {}", Family::addr_port(a, *port)),
                Stmt::DnatMap {
                    modulus,
                    offset,
                    map,
                } => write!(
                    out,
                    "dnat {ip} to numgen random mod {modulus} offset {offset} map @{map}"
                ),
                Stmt::Masquerade { fully_random } => write!(
                    out,
                    "masquerade{}",
                    if *fully_random { " fully-random" } else { "" }
                ),
                Stmt::Reject => write!(out, "reject"),
                Stmt::Verdict(v) => write!(out, "{}", v.text()),
            };
        }
        out
    }

    /// The kernel expressions of this rule in family `f`.
    pub fn encode(&self, f: Family, e: &mut Exprs) {
        let v6 = f == Family::V6;
        let alen: u32 = if v6 { 16 } else { 4 };
        // IPv4/IPv6 header offsets of the source and destination address.
        let (saddr, daddr) = if v6 { (8, 24) } else { (12, 16) };
        for s in &self.0 {
            match s {
                Stmt::CtStateNew => {
                    e.ct_load(expr::NFT_CT_STATE, 1);
                    e.bitwise(1, &8u32.to_ne_bytes(), &[0; 4]);
                    e.cmp(expr::NFT_CMP_NEQ, &[0; 4]);
                }
                Stmt::CtStatusDnat => {
                    e.ct_load(expr::NFT_CT_STATUS, 1);
                    // IPS_DST_NAT
                    e.bitwise(1, &0x20u32.to_ne_bytes(), &[0; 4]);
                    e.cmp(expr::NFT_CMP_NEQ, &[0; 4]);
                }
                Stmt::FibDaddrLocal => {
                    e.fib_daddr_type(1);
                    // RTN_LOCAL
                    e.cmp(expr::NFT_CMP_EQ, &2u32.to_ne_bytes());
                }
                Stmt::DaddrNotLoopback => {
                    let lo: IpAddr = if v6 {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv4Addr::new(127, 0, 0, 0).into()
                    };
                    prefix_match(e, daddr, &lo, if v6 { 128 } else { 8 }, true);
                }
                Stmt::Daddr(a) => prefix_match(e, daddr, a, alen as u8 * 8, false),
                Stmt::Saddr { cidr, not } => prefix_match(e, saddr, &cidr.addr, cidr.prefix, *not),
                Stmt::SaddrIn(set) => {
                    e.payload(expr::NFT_PAYLOAD_NETWORK_HEADER, saddr, alen, 1);
                    e.lookup(set, 1, None);
                }
                Stmt::PairIn(set) => {
                    e.payload(expr::NFT_PAYLOAD_NETWORK_HEADER, saddr, alen, 1);
                    e.payload(
                        expr::NFT_PAYLOAD_NETWORK_HEADER,
                        daddr,
                        alen,
                        expr::reg_after(alen),
                    );
                    e.lookup(set, 1, None);
                }
                Stmt::L4Proto(p) => {
                    e.meta_load(expr::NFT_META_L4PROTO, 1);
                    e.cmp(expr::NFT_CMP_EQ, &[proto_number(*p)]);
                }
                Stmt::NumgenLt { modulus, lt } => {
                    e.numgen(*modulus, 0, 1);
                    e.hton32(1);
                    e.cmp(expr::NFT_CMP_LT, &lt.to_be_bytes());
                }
                Stmt::MarkClear(bit) => {
                    e.meta_load(expr::NFT_META_MARK, 1);
                    e.bitwise(1, &bit.to_ne_bytes(), &[0; 4]);
                    e.cmp(expr::NFT_CMP_EQ, &[0; 4]);
                }
                Stmt::MarkOr(bit) => {
                    e.meta_load(expr::NFT_META_MARK, 1);
                    e.bitwise(1, &(!bit).to_ne_bytes(), &bit.to_ne_bytes());
                    e.meta_set(expr::NFT_META_MARK, 1);
                }
                Stmt::MarkXor(bit) => {
                    e.meta_load(expr::NFT_META_MARK, 1);
                    e.bitwise(1, &u32::MAX.to_ne_bytes(), &bit.to_ne_bytes());
                    e.meta_set(expr::NFT_META_MARK, 1);
                }
                Stmt::UpdateSaddr(set) => {
                    e.payload(expr::NFT_PAYLOAD_NETWORK_HEADER, saddr, alen, 1);
                    e.dynset_update(set, 1);
                }
                Stmt::Vmap(key, m) => {
                    let mut at = 0;
                    if *key == DispatchKey::AddrProtoPort {
                        e.payload(expr::NFT_PAYLOAD_NETWORK_HEADER, daddr, alen, 1);
                        at = alen;
                    }
                    e.meta_load(expr::NFT_META_L4PROTO, expr::reg_after(at));
                    e.payload(
                        expr::NFT_PAYLOAD_TRANSPORT_HEADER,
                        2,
                        2,
                        expr::reg_after(at + 4),
                    );
                    e.lookup(m, 1, Some(0));
                }
                Stmt::Dnat(a, port) => {
                    let mut addr = Vec::new();
                    crate::netlink::value::addr(a, &mut addr);
                    e.immediate_data(1, &addr);
                    e.immediate_data(2, &port.to_be_bytes());
                    // NF_NAT_RANGE_PROTO_SPECIFIED, as nft sends it.
                    e.dnat(f, 1, 2, Some(2));
                }
                Stmt::DnatMap {
                    modulus,
                    offset,
                    map,
                } => {
                    e.numgen(*modulus, *offset, 1);
                    e.lookup(map, 1, Some(1));
                    e.dnat(f, 1, expr::reg_after(alen), None);
                }
                Stmt::Masquerade { fully_random } => {
                    // NF_NAT_RANGE_PROTO_RANDOM_FULLY
                    e.masq(fully_random.then_some(0x10));
                }
                Stmt::Reject => {
                    // ICMP(v6) port unreachable.
                    e.reject(0, if v6 { 4 } else { 3 });
                }
                Stmt::Verdict(v) => {
                    let (code, chain) = v.code();
                    e.verdict(code, chain);
                }
            }
        }
    }
}

/// IANA protocol number.
pub fn proto_number(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
        Proto::Sctp => 132,
    }
}

/// `ADDR [!=] PREFIX` at header offset `off`, as nft encodes it: a
/// byte-aligned prefix loads just its bytes; any other loads the address
/// and masks it.
fn prefix_match(e: &mut Exprs, off: u32, a: &IpAddr, prefix: u8, not: bool) {
    let mut bytes = Vec::new();
    crate::netlink::value::addr(a, &mut bytes);
    let op = if not {
        expr::NFT_CMP_NEQ
    } else {
        expr::NFT_CMP_EQ
    };
    let bits = usize::from(prefix);
    if bits > 0 && bits.is_multiple_of(8) {
        e.payload(expr::NFT_PAYLOAD_NETWORK_HEADER, off, (bits / 8) as u32, 1);
        e.cmp(op, &bytes[..bits / 8]);
        return;
    }
    let mask: Vec<u8> = (0..bytes.len())
        .map(|i| {
            let have = bits.saturating_sub(i * 8).min(8);
            if have == 0 { 0 } else { 0xffu8 << (8 - have) }
        })
        .collect();
    let net: Vec<u8> = bytes.iter().zip(&mask).map(|(b, m)| b & m).collect();
    e.payload(expr::NFT_PAYLOAD_NETWORK_HEADER, off, bytes.len() as u32, 1);
    e.bitwise(1, &mask, &vec![0; bytes.len()]);
    e.cmp(op, &net);
}
