//! Set element changes sent to the kernel over netlink, without the `nft`
//! binary.
//!
//! A one-endpoint change in node mode is a few map elements (see
//! [`crate::nft`]). Through `nft -f` it costs a process and a fetch of the
//! table's cache, ~40-60 ms at 10k services; the kernel itself takes ~1-2
//! ms. So a change made of element additions and removals only is encoded
//! here as one nf_tables batch (`NFT_MSG_NEWSETELEM`/`DELSETELEM`) and
//! written to a `NETLINK_NETFILTER` socket; anything else goes through
//! `nft -f`.
//!
//! The messages follow `linux/netfilter/nf_tables.h` and
//! `linux/netfilter/nfnetlink.h`. The kernel runs a batch while it is sent
//! and queues an error reply for any failure (of a message or of the
//! commit) before the send returns, as `nft` relies on: no reply is
//! success.

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
const NFTA_DATA_VALUE: u16 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// One element to add to or remove from a set or map of a table.
#[derive(Clone, Debug, PartialEq)]
pub struct Element {
    pub ipv6: bool,
    pub table: String,
    pub set: String,
    pub add: bool,
    pub key: Vec<u8>,
    /// The mapped data (maps only, and only when adding).
    pub data: Option<Vec<u8>>,
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

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn nested(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    fill(&mut inner);
    attr(out, kind | NLA_F_NESTED, &inner);
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

/// Larger batches go through `nft -f` (a netlink datagram must fit the
/// socket's send buffer, ~208 KiB by default).
const MAX_BATCH: usize = 128 * 1024;

/// The batch for `elements`: begin, then one message per set and kind
/// (removals and additions in the order they first appear, so a slot's
/// removal precedes its new value), at most [`PER_MESSAGE`] elements each,
/// then end. No message asks for an ACK: the kernel runs a batch while it
/// is sent, and reports every failure (of a message or of the commit) as
/// an error reply, queued before the send returns (as `nft` relies on).
pub fn batch(elements: &[Element], first_seq: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut seq = first_seq;
    message(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    // (IPv6, table, set, add) → its elements.
    type Group<'a> = ((bool, &'a str, &'a str, bool), Vec<&'a Element>);
    let mut groups: Vec<Group> = Vec::new();
    for e in elements {
        let key = (e.ipv6, e.table.as_str(), e.set.as_str(), e.add);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(e),
            None => groups.push((key, vec![e])),
        }
    }
    for ((ipv6, table, set, add), members) in &groups {
        for part in members.chunks(PER_MESSAGE) {
            seq += 1;
            let mut attrs = Vec::new();
            attr(&mut attrs, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
            attr(&mut attrs, NFTA_SET_ELEM_LIST_SET, &cstr(set));
            nested(&mut attrs, NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
                for e in part {
                    nested(list, NFTA_LIST_ELEM, |el| {
                        nested(el, NFTA_SET_ELEM_KEY, |k| attr(k, NFTA_DATA_VALUE, &e.key));
                        if let (true, Some(d)) = (e.add, &e.data) {
                            nested(el, NFTA_SET_ELEM_DATA, |v| attr(v, NFTA_DATA_VALUE, d));
                        }
                    });
                }
            });
            let (kind, flags) = if *add {
                (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE)
            } else {
                (NFT_MSG_DELSETELEM, NLM_F_REQUEST)
            };
            let family = if *ipv6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
            message(
                &mut out,
                (NFNL_SUBSYS_NFTABLES << 8) | kind,
                flags,
                seq,
                family,
                0,
                &attrs,
            );
        }
    }
    seq += 1;
    message(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    out
}

/// A `NETLINK_NETFILTER` socket, kept open between changes (closing one
/// waits for an RCU grace period: ~5-15 ms, more than the change itself).
/// Non-blocking: nothing here waits on the kernel.
pub struct Conn {
    sock: Socket,
    seq: u32,
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
        Ok(Conn { sock, seq: 1 })
    }

    /// Applies `elements` in one transaction: all or nothing. After an
    /// error the connection should be dropped, and the kernel's state is
    /// unknown (a full resync puts it right).
    pub fn apply(&mut self, elements: &[Element]) -> Result<(), String> {
        if elements.is_empty() {
            return Ok(());
        }
        let bytes = batch(elements, self.seq);
        if bytes.len() > MAX_BATCH {
            return Err(format!("{} bytes: too large for one batch", bytes.len()));
        }
        self.seq = self.seq.wrapping_add(elements.len() as u32 + 2);
        let mut sock = &self.sock;
        sock.write_all(&bytes)
            .map_err(|e| format!("netlink send: {e}"))?;
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
                        return Err(format!("netlink: set element update refused: {e}"));
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

    #[test]
    fn a_batch_is_framed_as_nft_frames_it() {
        let e = Element {
            ipv6: false,
            table: "t".into(),
            set: "eps".into(),
            add: false,
            key: vec![10, 96, 0, 1, 0, 80, 0, 0, 0, 0, 0, 0],
            data: None,
        };
        let bytes = batch(&[e.clone(), e], 0);
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
