//! nf_tables transactions sent to the kernel over netlink, without the
//! `nft` binary: tables, chains, sets, rules ([`expr`]) and elements, as
//! one batch per sync.
//!
//! Through `nft -f`, a sync costs a process, parsing the text (~1 s for a
//! 10k-service table) and, for a partial sync, a fetch of the table's cache
//! (~40 ms at 10k). Encoded here, a 10k full sync is ~0.15 s of encoding
//! and ~0.6 s in the kernel, and one changed endpoint ~1 ms in the kernel.
//!
//! The messages follow `linux/netfilter/nf_tables.h` and
//! `linux/netfilter/nfnetlink.h`, laid out as `nft` 1.0.6 lays them out
//! (checked: `nft list` reads back what nft itself would have made). The
//! kernel runs a batch while it is sent and queues an error reply for any
//! failure (of a message or of the commit) before the send returns, as
//! `nft` relies on: no reply is success.

use std::io::{Read, Write};
use std::net::IpAddr;

use socket2::{Domain, Protocol, Socket, Type};

const AF_NETLINK: i32 = 16;
const NETLINK_NETFILTER: i32 = 12;
const NFNETLINK_V0: u8 = 0;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// A set element, encoded where it is written (no copy per element).
pub trait ElemCode {
    /// The key's bytes, as the kernel stores them.
    fn key(&self, out: &mut Vec<u8>);
    /// Whether it maps to something (a map's element, when added).
    fn has_data(&self) -> bool;
    /// The `NFTA_DATA_*` attribute of what it maps to.
    fn data(&self, out: &mut Vec<u8>);
}

/// Encodings of nft values as the kernel stores them in set keys and data:
/// each part of a concatenation padded to 4 bytes.
pub mod value {
    use super::IpAddr;

    /// An address (network order).
    pub fn addr(ip: &IpAddr, out: &mut Vec<u8>) {
        match ip {
            IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
        }
    }

    /// An `inet_service` (network order, padded).
    pub fn port(p: u16, out: &mut Vec<u8>) {
        out.extend_from_slice(&p.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }

    /// A host-order 32-bit integer (`numgen`, `mark`).
    pub fn host_u32(v: u32, out: &mut Vec<u8>) {
        out.extend_from_slice(&v.to_ne_bytes());
    }
}

/// Rule expressions, encoded as the kernel takes them
/// (`NFTA_RULE_EXPRESSIONS`). Registers are numbered as `nft` numbers
/// them: 1-4 the 16-byte ones, 8-23 the 4-byte ones.
pub mod expr {
    use super::{attr, attr_str, nested};
    use crate::services::Family;

    pub const NF_DROP: i32 = 0;
    pub const NFT_JUMP: i32 = -3;
    pub const NFT_GOTO: i32 = -4;
    pub const NFT_RETURN: i32 = -5;
    pub const NFT_CMP_EQ: u32 = 0;
    pub const NFT_CMP_NEQ: u32 = 1;
    pub const NFT_CMP_LT: u32 = 2;
    pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
    pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
    pub const NFT_META_MARK: u32 = 3;
    pub const NFT_META_L4PROTO: u32 = 16;
    pub const NFT_CT_STATE: u32 = 0;
    pub const NFT_CT_STATUS: u32 = 2;

    /// The register holding the data `bytes` bytes into a concatenation
    /// that starts in register 1.
    pub fn reg_after(bytes: u32) -> u32 {
        let k = bytes.div_ceil(4);
        if k.is_multiple_of(4) {
            1 + k / 4
        } else {
            8 + k
        }
    }

    fn be(v: u32) -> [u8; 4] {
        v.to_be_bytes()
    }

    /// A rule's expression list being built.
    #[derive(Default)]
    pub struct Exprs {
        pub(crate) buf: Vec<u8>,
    }

    impl Exprs {
        fn expr(&mut self, name: &str, fill: impl FnOnce(&mut Vec<u8>)) {
            nested(&mut self.buf, super::NFTA_LIST_ELEM, |el| {
                attr_str(el, 1, name);
                nested(el, 2, fill);
            });
        }
        fn data(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
            nested(out, kind, |d| attr(d, super::NFTA_DATA_VALUE, value));
        }
        pub fn payload(&mut self, base: u32, offset: u32, len: u32, dreg: u32) {
            self.expr("payload", |a| {
                attr(a, 1, &be(dreg));
                attr(a, 2, &be(base));
                attr(a, 3, &be(offset));
                attr(a, 4, &be(len));
            });
        }
        pub fn meta_load(&mut self, key: u32, dreg: u32) {
            self.expr("meta", |a| {
                attr(a, 2, &be(key));
                attr(a, 1, &be(dreg));
            });
        }
        pub fn meta_set(&mut self, key: u32, sreg: u32) {
            self.expr("meta", |a| {
                attr(a, 2, &be(key));
                attr(a, 3, &be(sreg));
            });
        }
        pub fn ct_load(&mut self, key: u32, dreg: u32) {
            self.expr("ct", |a| {
                attr(a, 2, &be(key));
                attr(a, 1, &be(dreg));
            });
        }
        /// `reg = (reg & mask) ^ xor` on register 1's first `mask.len()` bytes.
        pub fn bitwise(&mut self, reg: u32, mask: &[u8], xor: &[u8]) {
            self.expr("bitwise", |a| {
                attr(a, 1, &be(reg));
                attr(a, 2, &be(reg));
                attr(a, 3, &be(mask.len() as u32));
                Self::data(a, 4, mask);
                Self::data(a, 5, xor);
            });
        }
        /// Compares register 1 with `value`.
        pub fn cmp(&mut self, op: u32, value: &[u8]) {
            self.expr("cmp", |a| {
                attr(a, 1, &be(1));
                attr(a, 2, &be(op));
                Self::data(a, 3, value);
            });
        }
        /// Looks register 1 up in `set`; a map writes its data to `dreg`
        /// (0: the verdict).
        pub fn lookup(&mut self, set: &str, sreg: u32, dreg: Option<u32>) {
            self.expr("lookup", |a| {
                attr(a, 2, &be(sreg));
                if let Some(d) = dreg {
                    attr(a, 3, &be(d));
                }
                attr_str(a, 1, set);
            });
        }
        pub fn dynset_update(&mut self, set: &str, sreg: u32) {
            self.expr("dynset", |a| {
                attr(a, 4, &be(sreg));
                // NFT_DYNSET_OP_UPDATE
                attr(a, 3, &be(1));
                attr_str(a, 1, set);
            });
        }
        pub fn fib_daddr_type(&mut self, dreg: u32) {
            self.expr("fib", |a| {
                // NFTA_FIB_F_DADDR, NFT_FIB_RESULT_ADDRTYPE
                attr(a, 3, &be(2));
                attr(a, 2, &be(3));
                attr(a, 1, &be(dreg));
            });
        }
        pub fn numgen(&mut self, modulus: u32, offset: u32, dreg: u32) {
            self.expr("numgen", |a| {
                attr(a, 1, &be(dreg));
                attr(a, 2, &be(modulus));
                // NFT_NG_RANDOM
                attr(a, 3, &be(1));
                attr(a, 4, &be(offset));
            });
        }
        /// Register `reg`'s first 4 bytes to network order.
        pub fn hton32(&mut self, reg: u32) {
            self.expr("byteorder", |a| {
                attr(a, 1, &be(reg));
                attr(a, 2, &be(reg));
                attr(a, 3, &be(1));
                attr(a, 4, &be(4));
                attr(a, 5, &be(4));
            });
        }
        pub fn immediate_data(&mut self, dreg: u32, value: &[u8]) {
            self.expr("immediate", |a| {
                attr(a, 1, &be(dreg));
                Self::data(a, 2, value);
            });
        }
        pub fn verdict(&mut self, code: i32, chain: Option<&str>) {
            self.expr("immediate", |a| {
                attr(a, 1, &be(0));
                nested(a, 2, |d| super::verdict(d, code, chain));
            });
        }
        pub fn dnat(&mut self, f: Family, addr: u32, proto: u32, flags: Option<u32>) {
            self.expr("nat", |a| {
                // NFT_NAT_DNAT
                attr(a, 1, &be(1));
                attr(a, 2, &be(u32::from(super::family(f))));
                attr(a, 3, &be(addr));
                attr(a, 5, &be(proto));
                if let Some(fl) = flags {
                    attr(a, 7, &be(fl));
                }
            });
        }
        pub fn masq(&mut self, flags: Option<u32>) {
            self.expr("masq", |a| {
                if let Some(fl) = flags {
                    attr(a, 1, &be(fl));
                }
            });
        }
        pub fn reject(&mut self, kind: u32, code: u8) {
            self.expr("reject", |a| {
                attr(a, 1, &be(kind));
                attr(a, 2, &[code]);
            });
        }
    }
}

/// `NFTA_DATA_VERDICT`: code and, for a jump or goto, the chain.
pub(crate) fn verdict(out: &mut Vec<u8>, code: i32, chain: Option<&str>) {
    nested(out, 2, |v| {
        attr(v, 1, &code.to_be_bytes());
        if let Some(c) = chain {
            attr_str(v, 2, c);
        }
    });
}

fn family(f: crate::services::Family) -> u8 {
    match f {
        crate::services::Family::V4 => NFPROTO_IPV4,
        crate::services::Family::V6 => NFPROTO_IPV6,
    }
}

pub(crate) fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A nested attribute, written in place (its length patched after).
fn nested(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    fill(out);
    // Every attribute inside is padded to 4 bytes already.
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// An attribute whose payload `fill` writes in place (length patched,
/// padded after).
pub(crate) fn attr_with(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&kind.to_ne_bytes());
    fill(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A NUL-terminated string attribute.
fn attr_str(out: &mut Vec<u8>, kind: u16, s: &str) {
    let len = 4 + s.len() + 1;
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// One netlink message: header, nfgenmsg, attributes.
fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = 16 + 4 + attrs.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(NFNETLINK_V0);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(attrs);
}

/// Elements per message: one message carries many elements of one set.
const PER_MESSAGE: usize = 256;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NLM_F_APPEND: u16 = 0x800;

/// A base chain's hook.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    /// `filter` or `nat`.
    pub kind: &'static str,
    /// `NF_INET_*`: prerouting 0, input 1, forward 2, output 3, postrouting 4.
    pub num: u32,
    pub priority: i32,
}

/// A set or map declaration, as `NFT_MSG_NEWSET` carries it.
#[derive(Clone, Debug, PartialEq)]
pub struct SetSpec {
    pub flags: u32,
    /// nft's datatype number (concatenations: 6 bits per part).
    pub key_type: u32,
    pub key_len: u32,
    /// (datatype, length) of a map's data; verdicts are `0xffffff00`, 0.
    pub data: Option<(u32, u32)>,
    pub timeout_ms: Option<u64>,
    /// nft's own annotations (byte orders, `typeof` expressions), so
    /// `nft list` shows the set as if nft had made it.
    pub udata: Vec<u8>,
}

/// One nf_tables transaction being built: begin, messages, end. No
/// message asks for an ACK: the kernel runs a batch while it is sent, and
/// reports every failure (of a message or of the commit) as an error
/// reply, queued before the send returns (as `nft` relies on).
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    set_id: u32,
}

impl Batch {
    pub fn new(first_seq: u32) -> Batch {
        let mut buf = Vec::new();
        message(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            first_seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        Batch {
            buf,
            seq: first_seq,
            set_id: 0,
        }
    }

    fn msg(&mut self, kind: u16, flags: u16, f: crate::services::Family, attrs: &[u8]) {
        self.seq = self.seq.wrapping_add(1);
        message(
            &mut self.buf,
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | flags,
            self.seq,
            family(f),
            0,
            attrs,
        );
    }

    pub fn add_table(&mut self, f: crate::services::Family, name: &str, comment: Option<&str>) {
        let mut a = Vec::new();
        attr_str(&mut a, 1, name);
        attr(&mut a, 2, &0u32.to_be_bytes());
        if let Some(c) = comment {
            // NFTNL_UDATA_TABLE_COMMENT
            let c = cstr(c);
            let mut u = vec![0, c.len() as u8];
            u.extend_from_slice(&c);
            attr(&mut a, 6, &u);
        }
        self.msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, f, &a);
    }

    pub fn del_table(&mut self, f: crate::services::Family, name: &str) {
        let mut a = Vec::new();
        attr_str(&mut a, 1, name);
        self.msg(NFT_MSG_DELTABLE, 0, f, &a);
    }

    pub fn add_chain(
        &mut self,
        f: crate::services::Family,
        table: &str,
        name: &str,
        hook: Option<Hook>,
    ) {
        let mut a = Vec::new();
        attr_str(&mut a, 1, table);
        attr_str(&mut a, 3, name);
        if let Some(h) = hook {
            attr_str(&mut a, 7, h.kind);
            // policy accept
            attr(&mut a, 5, &1u32.to_be_bytes());
            nested(&mut a, 4, |n| {
                attr(n, 1, &h.num.to_be_bytes());
                attr(n, 2, &h.priority.to_be_bytes());
            });
        }
        self.msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE, f, &a);
    }

    fn table_and(
        &mut self,
        kind: u16,
        f: crate::services::Family,
        table: &str,
        what: u16,
        name: &str,
    ) {
        let mut a = Vec::new();
        attr_str(&mut a, 1, table);
        attr_str(&mut a, what, name);
        self.msg(kind, 0, f, &a);
    }

    /// Removes every rule of a chain.
    pub fn flush_chain(&mut self, f: crate::services::Family, table: &str, name: &str) {
        self.table_and(NFT_MSG_DELRULE, f, table, 2, name);
    }

    pub fn del_chain(&mut self, f: crate::services::Family, table: &str, name: &str) {
        self.table_and(NFT_MSG_DELCHAIN, f, table, 3, name);
    }

    pub fn del_set(&mut self, f: crate::services::Family, table: &str, name: &str) {
        self.table_and(NFT_MSG_DELSET, f, table, 2, name);
    }

    pub fn add_set(&mut self, f: crate::services::Family, table: &str, name: &str, s: &SetSpec) {
        let mut a = Vec::new();
        attr_str(&mut a, 1, table);
        attr_str(&mut a, 2, name);
        attr(&mut a, 3, &s.flags.to_be_bytes());
        attr(&mut a, 4, &s.key_type.to_be_bytes());
        attr(&mut a, 5, &s.key_len.to_be_bytes());
        if let Some((t, l)) = s.data {
            attr(&mut a, 6, &t.to_be_bytes());
            attr(&mut a, 7, &l.to_be_bytes());
        }
        // A set ID is required (rules may refer to a new set by it).
        self.set_id = self.set_id.wrapping_add(1);
        attr(&mut a, 10, &self.set_id.to_be_bytes());
        if let Some(t) = s.timeout_ms {
            attr(&mut a, 11, &t.to_be_bytes());
        }
        if !s.udata.is_empty() {
            attr(&mut a, 13, &s.udata);
        }
        self.msg(NFT_MSG_NEWSET, NLM_F_CREATE, f, &a);
    }

    /// Appends a rule to a chain.
    pub fn add_rule(
        &mut self,
        f: crate::services::Family,
        table: &str,
        chain: &str,
        exprs: &expr::Exprs,
    ) {
        let mut a = Vec::new();
        attr_str(&mut a, 1, table);
        attr_str(&mut a, 2, chain);
        attr(&mut a, 4 | NLA_F_NESTED, &exprs.buf);
        self.msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, f, &a);
    }

    /// Elements of one set, all added or all removed: one message per
    /// [`PER_MESSAGE`], each element encoded in place. (A slot's removal
    /// and its new value go in separate calls, removals first.)
    pub fn set_elements<E: ElemCode>(
        &mut self,
        f: crate::services::Family,
        table: &str,
        set: &str,
        add: bool,
        elems: &[E],
    ) {
        let (kind, flags) = if add {
            (NFT_MSG_NEWSETELEM, NLM_F_CREATE)
        } else {
            (NFT_MSG_DELSETELEM, 0)
        };
        let mut attrs = Vec::new();
        for part in elems.chunks(PER_MESSAGE) {
            attrs.clear();
            attr_str(&mut attrs, NFTA_SET_ELEM_LIST_TABLE, table);
            attr_str(&mut attrs, NFTA_SET_ELEM_LIST_SET, set);
            nested(&mut attrs, NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
                for e in part {
                    nested(list, NFTA_LIST_ELEM, |el| {
                        nested(el, NFTA_SET_ELEM_KEY, |k| {
                            attr_with(k, NFTA_DATA_VALUE, |v| e.key(v))
                        });
                        if add && e.has_data() {
                            nested(el, NFTA_SET_ELEM_DATA, |d| e.data(d));
                        }
                    });
                }
            });
            self.msg(kind, flags, f, &attrs);
        }
    }

    /// The batch, ended; and the next free sequence number.
    pub fn finish(mut self) -> (Vec<u8>, u32) {
        self.seq = self.seq.wrapping_add(1);
        message(
            &mut self.buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            self.seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        (self.buf, self.seq.wrapping_add(1))
    }
}

/// A `NETLINK_NETFILTER` socket, kept open between changes (closing one
/// waits for an RCU grace period: ~5-15 ms, more than the change itself).
/// Non-blocking: nothing here waits on the kernel.
pub struct Conn {
    sock: Socket,
    seq: u32,
    /// What the send buffer was forced to (0: the default).
    sndbuf: usize,
}

impl Conn {
    pub fn open() -> Result<Conn, String> {
        let sock = Socket::new(
            Domain::from(AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(NETLINK_NETFILTER)),
        )
        .map_err(|e| format!("netlink socket: {e}"))?;
        sock.set_nonblocking(true)
            .map_err(|e| format!("netlink socket: {e}"))?;
        Ok(Conn {
            sock,
            seq: 1,
            sndbuf: 0,
        })
    }

    /// A transaction to fill and [`Conn::send`].
    pub fn batch(&self) -> Batch {
        Batch::new(self.seq)
    }

    /// Sends a transaction: all or nothing. After an error the connection
    /// should be dropped, and the kernel's state is unknown (a full resync
    /// puts it right).
    pub fn send(&mut self, batch: Batch) -> Result<(), String> {
        let (bytes, next) = batch.finish();
        self.seq = next;
        // One datagram must hold the whole batch: grow the send buffer
        // past `wmem_max` if need be, as nft does (root only).
        if bytes.len() + 4096 > self.sndbuf {
            let want = (bytes.len() + 65536).next_power_of_two();
            use nix::sys::socket::{setsockopt, sockopt};
            setsockopt(&self.sock, sockopt::SndBufForce, &want)
                .map_err(|e| format!("netlink send buffer of {want} bytes: {e}"))?;
            // Room for the error replies too (each quotes its message).
            setsockopt(&self.sock, sockopt::RcvBufForce, &want)
                .map_err(|e| format!("netlink receive buffer of {want} bytes: {e}"))?;
            self.sndbuf = want;
        }
        let mut sock = &self.sock;
        sock.write_all(&bytes)
            .map_err(|e| format!("netlink send ({} bytes): {e}", bytes.len()))?;
        // Whatever the kernel had to say is queued by now: any error reply
        // (for a message or for the commit) means the batch did not apply.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sock.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(format!("netlink receive: {e}")),
            };
            let mut at = 0;
            while at + 16 <= n {
                let len =
                    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
                if len < 16 || at + len > n {
                    return Err("netlink: malformed reply".into());
                }
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if kind == NLMSG_ERROR && len >= 20 {
                    let code = i32::from_ne_bytes([
                        buf[at + 16],
                        buf[at + 17],
                        buf[at + 18],
                        buf[at + 19],
                    ]);
                    if code != 0 {
                        let e = std::io::Error::from_raw_os_error(-code);
                        // The reply quotes the refused message's header.
                        let what = if len >= 36 {
                            let kind = u16::from_ne_bytes([buf[at + 24], buf[at + 25]]) & 0xff;
                            let seq = u32::from_ne_bytes([
                                buf[at + 28],
                                buf[at + 29],
                                buf[at + 30],
                                buf[at + 31],
                            ]);
                            format!(" (message {seq}, type {kind})")
                        } else {
                            String::new()
                        };
                        return Err(format!("netlink: nf_tables refused the batch{what}: {e}"));
                    }
                }
                at += (len + 3) & !3;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key, removed (no data).
    struct Removed(Vec<u8>);

    impl ElemCode for Removed {
        fn key(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.0);
        }
        fn has_data(&self) -> bool {
            false
        }
        fn data(&self, _: &mut Vec<u8>) {}
    }

    #[test]
    fn a_batch_is_framed_as_nft_frames_it() {
        let key = vec![10, 96, 0, 1, 0, 80, 0, 0, 0, 0, 0, 0];
        let mut b = Batch::new(0);
        let v4 = crate::services::Family::V4;
        b.set_elements(v4, "t", "eps", false, &[Removed(key.clone()), Removed(key)]);
        let bytes = b.finish().0;
        // begin (20) + delsetelem (64 as nft 1.0.6 sends one element, and
        // 24 more for the second in the same message) + end (20).
        assert_eq!(bytes.len(), 20 + 64 + 24 + 20);
        let del = &bytes[20..108];
        assert_eq!(u32::from_ne_bytes([del[0], del[1], del[2], del[3]]), 88);
        assert_eq!(u16::from_ne_bytes([del[4], del[5]]), 0x0a0e);
        // table "t", set "eps", then the nested element list.
        assert_eq!(&del[20..26], &[6, 0, 1, 0, b't', 0]);
        assert_eq!(&del[28..36], &[8, 0, 2, 0, b'e', b'p', b's', 0]);
        assert_eq!(&del[36..40], &[52, 0, 3, 0x80]);
        assert_eq!(&del[40..44], &[24, 0, 1, 0x80]);
        assert_eq!(&del[64..68], &[24, 0, 1, 0x80]);
    }
}
