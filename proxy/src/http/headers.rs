//! Header handling shared by the request and response sides: hop-by-hop
//! headers, upgrades, request ids, cookies.

use std::cell::RefCell;

use bytes::BytesMut;
use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::freelist::FreeList;

pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    KEEP_ALIVE,
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];

/// Header maps are sized for exactly what they will hold. A map grows in
/// powers of two: up to 6 entries take one 6-entry allocation, 7 to 12 take
/// 12 × 104 bytes, over glibc's 1 KiB per-thread cache, and that
/// allocation (and its free) takes malloc's slow path, which consolidates
/// its fast bins each time: about 400 instructions per map per request
/// (callgrind, bench/instructions.sh). A few spare entries "for what
/// forwarding adds" cost more than the growth they avoid.
///
/// Header names forwarding drops from a request or response before it adds
/// its own: counted while a head is parsed, so its map is sized for what
/// it will hold.
pub fn is_hop_by_hop_name(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|n| n.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// The name of a header in a head httparse has parsed. The names heads
/// most often carry are matched here, case-blind and a word at a time, and
/// cost a comparison or two; `HeaderName::from_bytes` lowercases every name
/// into a scratch buffer, looks it up, and copies one it does not know
/// (an allocation for each `x-request-id`). The rest go to it.
///
/// Only for names httparse has taken as tokens: OR-ing 0x20 into a token
/// byte gives a lowercase letter only from that letter or its capital, and
/// `-` only from `-` (the other candidate, CR, is no token byte).
pub fn header_name(b: &[u8]) -> Result<HeaderName, header::InvalidHeaderName> {
    let known = match b.len() {
        2 if lower_eq(b, b"te") => Some(header::TE),
        4 if lower_eq(b, b"host") => Some(header::HOST),
        4 if lower_eq(b, b"date") => Some(header::DATE),
        4 if lower_eq(b, b"etag") => Some(header::ETAG),
        4 if lower_eq(b, b"vary") => Some(header::VARY),
        6 if lower_eq(b, b"accept") => Some(header::ACCEPT),
        6 if lower_eq(b, b"server") => Some(header::SERVER),
        6 if lower_eq(b, b"cookie") => Some(header::COOKIE),
        6 if lower_eq(b, b"origin") => Some(header::ORIGIN),
        6 if lower_eq(b, b"expect") => Some(header::EXPECT),
        7 if lower_eq(b, b"referer") => Some(header::REFERER),
        7 if lower_eq(b, b"expires") => Some(header::EXPIRES),
        7 if lower_eq(b, b"upgrade") => Some(header::UPGRADE),
        8 if lower_eq(b, b"location") => Some(header::LOCATION),
        10 if lower_eq(b, b"user-agent") => Some(header::USER_AGENT),
        10 if lower_eq(b, b"connection") => Some(header::CONNECTION),
        10 if lower_eq(b, b"set-cookie") => Some(header::SET_COOKIE),
        10 if lower_eq(b, b"keep-alive") => Some(KEEP_ALIVE),
        12 if lower_eq(b, b"content-type") => Some(header::CONTENT_TYPE),
        12 if lower_eq(b, b"x-request-id") => Some(X_REQUEST_ID),
        13 if lower_eq(b, b"cache-control") => Some(header::CACHE_CONTROL),
        13 if lower_eq(b, b"authorization") => Some(header::AUTHORIZATION),
        13 if lower_eq(b, b"last-modified") => Some(header::LAST_MODIFIED),
        13 if lower_eq(b, b"accept-ranges") => Some(header::ACCEPT_RANGES),
        14 if lower_eq(b, b"content-length") => Some(header::CONTENT_LENGTH),
        15 if lower_eq(b, b"accept-encoding") => Some(header::ACCEPT_ENCODING),
        15 if lower_eq(b, b"accept-language") => Some(header::ACCEPT_LANGUAGE),
        15 if lower_eq(b, b"x-forwarded-for") => Some(X_FORWARDED_FOR),
        17 if lower_eq(b, b"transfer-encoding") => Some(header::TRANSFER_ENCODING),
        17 if lower_eq(b, b"x-forwarded-proto") => Some(X_FORWARDED_PROTO),
        _ => None,
    };
    match known {
        Some(n) => Ok(n),
        None => HeaderName::from_bytes(b),
    }
}

/// `b` (a token) is `lower` (lowercase letters and `-`) in any case:
/// eight bytes at a time.
pub(crate) fn lower_eq(b: &[u8], lower: &[u8]) -> bool {
    const CASE: u64 = 0x2020_2020_2020_2020;
    if b.len() != lower.len() {
        return false;
    }
    let mut x = b.chunks_exact(8);
    let mut y = lower.chunks_exact(8);
    for (p, q) in x.by_ref().zip(y.by_ref()) {
        let (Ok(p), Ok(q)) = (<[u8; 8]>::try_from(p), <[u8; 8]>::try_from(q)) else {
            return false;
        };
        if u64::from_le_bytes(p) | CASE != u64::from_le_bytes(q) {
            return false;
        }
    }
    let (p, q) = (x.remainder(), y.remainder());
    p.len() == q.len() && p.iter().zip(q).all(|(a, b)| a | 0x20 == *b)
}

/// A comma-separated list value (`Connection`, `TE`) holds `token`, in any case.
pub fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The header names a Connection value lists (RFC 9110 7.6.1): its own
/// options `keep-alive` and `close` name nothing.
pub fn connection_names(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',').map(<[u8]>::trim_ascii).filter(|t| {
        !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"close")
    })
}

/// One `name: value` line of a head.
pub fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Which of them are here: one scan, no hashing. Most messages carry
    // none, or only `connection: keep-alive`.
    let mut present = 0u8;
    let mut te = false;
    for k in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|n| n == k) {
            present |= 1 << i;
        } else if k == header::TE {
            te = true;
        }
    }
    if present == 0 && !te {
        return;
    }
    // What every Connection header names is hop-by-hop too (RFC 9110
    // 7.6.1); its own options `keep-alive` and `close` name nothing.
    if present & 1 != 0 {
        let mut named: Vec<HeaderName> = Vec::new();
        for v in h.get_all(header::CONNECTION) {
            let Ok(v) = v.to_str() else { continue };
            for name in connection_names(v.as_bytes()) {
                if keep_upgrade && name.eq_ignore_ascii_case(b"upgrade") {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(name) {
                    named.push(n);
                }
            }
        }
        for n in named {
            h.remove(n);
        }
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) == 0
            || (keep_upgrade && (n == header::CONNECTION || n == header::UPGRADE))
        {
            continue;
        }
        h.remove(n);
    }
    if te && h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

pub fn is_upgrade(version: Version, h: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && h.contains_key(header::UPGRADE)
        && h.get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// An `x-request-id`: a random (version 4) UUID's 36 characters, kept by
/// value. An HTTP/1.1 upstream's head takes the bytes as they are; a map
/// takes a [`RequestId::to_value`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestId([u8; 36]);

impl RequestId {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Hex digits and dashes: always ASCII.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("")
    }

    /// As a header value, cut from a per-thread block of 64 (one
    /// allocation, not one each); a block is freed when the last value cut
    /// from it is.
    pub fn to_value(&self) -> HeaderValue {
        let id = IDS.with(|g| {
            let mut g = g.borrow_mut();
            if g.block.capacity() < self.0.len() {
                g.block = BytesMut::with_capacity(self.0.len() * 64);
            }
            g.block.extend_from_slice(&self.0);
            g.block.split().freeze()
        });
        HeaderValue::from_maybe_shared(id).unwrap_or(HeaderValue::from_static("0"))
    }
}

/// A random (v4) UUID, formatted in place: no intermediate strings.
///
/// The bits come from a per-thread xoshiro256++ (`SmallRng`) seeded from
/// the OS-seeded ChaCha thread generator: ids must be unique, not secret
/// (Envoy's are trace and sampling keys), and drawing 16 bytes from the
/// ChaCha generator cost about 430 instructions a request against about
/// 20.
pub fn request_id() -> RequestId {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let (x, y) = IDS.with(|g| {
        let mut g = g.borrow_mut();
        (g.rng.next_u64(), g.rng.next_u64())
    });
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&x.to_le_bytes());
    b[8..].copy_from_slice(&y.to_le_bytes());
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    // Where each byte's two digits go: 8-4-4-4-12, dashes between.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut out = [b'-'; 36];
    for (x, &o) in b.iter().zip(AT.iter()) {
        out[o] = HEX[usize::from(x >> 4)];
        out[o + 1] = HEX[usize::from(x & 0xf)];
    }
    RequestId(out)
}

struct IdGen {
    rng: SmallRng,
    block: BytesMut,
}

thread_local! {
    static IDS: RefCell<IdGen> = RefCell::new(IdGen {
        rng: SmallRng::from_rng(&mut rand::rng()),
        block: BytesMut::new(),
    });
}

/// Header maps taken from and given back to a per-thread free list: a
/// request's map and its response's map are each two allocations (the
/// index table and the entries), so reusing them saves four mallocs and
/// four frees per request. A map keeps its capacity when cleared; one
/// grown past `KEPT_ENTRIES` is freed instead, and at most `KEPT_MAPS`
/// wait per thread, so the list holds at most a few hundred KiB.
const KEPT_MAPS: usize = 64;
const KEPT_ENTRIES: usize = 48;

thread_local! {
    static MAPS: FreeList<HeaderMap> = const { FreeList::new(KEPT_MAPS) };
}

/// An empty header map with room for `entries` (one from the free list
/// when there is one).
pub fn header_map(entries: usize) -> HeaderMap {
    if let Some(mut m) = MAPS.with(FreeList::take)
        && m.try_reserve(entries).is_ok()
    {
        return m;
    }
    HeaderMap::with_capacity(entries)
}

/// Gives a map back for reuse: its entries are dropped now.
pub fn recycle(mut map: HeaderMap) {
    if map.capacity() > KEPT_ENTRIES {
        return;
    }
    map.clear();
    MAPS.with(|l| l.give(map));
}

pub fn cookie_value<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| {
            c.split(';').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then_some(v)
            })
        })
}

pub fn header_str(h: &HeaderMap, name: HeaderName) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[cfg(test)]
mod tests {
    use http::header::{HeaderMap, HeaderValue};

    #[test]
    fn a_recycled_map_comes_back_empty_with_its_room_and_a_grown_one_is_freed() {
        // Each test runs on its own thread: the free list starts empty.
        let mut m = super::header_map(8);
        let room = m.capacity();
        m.insert("x-a", HeaderValue::from_static("1"));
        m.append("x-a", HeaderValue::from_static("2"));
        super::recycle(m);
        let again = super::header_map(4);
        assert!(
            again.is_empty(),
            "a reused map holds nothing of its last request"
        );
        assert_eq!(again.get("x-a"), None);
        assert_eq!(again.capacity(), room, "the reused map is the recycled one");
        // Asking for more room than it has grows it.
        super::recycle(again);
        assert!(super::header_map(40).capacity() >= 40);
        // A map grown past what is kept is freed, not listed.
        let big = HeaderMap::<HeaderValue>::with_capacity(super::KEPT_ENTRIES + 1);
        super::recycle(big);
        assert!(super::MAPS.with(|l| l.is_empty()));
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn hop_by_hop_headers_and_what_connection_names_are_stripped() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("x-kept", "3"),
        ]);
        super::strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["host", "x-kept"]);

        // `te: trailers` passes; an upgrade keeps its two headers.
        let mut h = map(&[
            ("te", "trailers"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("expect", "100-continue"),
        ]);
        super::strip_hop_by_hop(&mut h, true);
        assert_eq!(names(&h), ["connection", "te", "upgrade"]);

        // Nothing to strip: nothing changes.
        let mut h = map(&[("host", "a"), ("accept", "*/*")]);
        super::strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["accept", "host"]);
    }

    #[test]
    fn hop_by_hop_names_are_counted_case_blind() {
        for n in [
            "Connection",
            "keep-alive",
            "PROXY-CONNECTION",
            "transfer-encoding",
            "upgrade",
            "expect",
        ] {
            assert!(super::is_hop_by_hop_name(n.as_bytes()), "{n}");
        }
        for n in ["te", "content-length", "connectionx", "x-upgrade"] {
            assert!(!super::is_hop_by_hop_name(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn known_names_are_matched_in_any_case_and_others_parsed() {
        for n in [
            "Host",
            "CONTENT-LENGTH",
            "content-type",
            "Transfer-Encoding",
            "X-Forwarded-For",
            "x-request-id",
            "Keep-Alive",
            "te",
            "Accept-Ranges",
        ] {
            let got = super::header_name(n.as_bytes()).expect("valid");
            let want = http::header::HeaderName::from_bytes(n.as_bytes()).expect("valid");
            assert_eq!(got, want, "{n}");
            assert_eq!(got.as_str(), n.to_ascii_lowercase());
        }
        // Near misses (a byte off, `_` for `-`, one short or long) are
        // parsed as what they are.
        for n in [
            "hosu",
            "content_length",
            "content-lengt",
            "x-request-idd",
            "Datf",
        ] {
            let got = super::header_name(n.as_bytes()).expect("valid");
            assert_eq!(got.as_str(), n.to_ascii_lowercase(), "{n}");
        }
        assert!(super::header_name(b"bad name").is_err());
        assert!(super::header_name(b"").is_err());
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let a = super::request_id();
        let s = a.as_str();
        assert_eq!(a.to_value().as_bytes(), s.as_bytes());
        assert_eq!(s.len(), 36);
        let parts: Vec<&str> = s.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            vec![8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "{s}");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{s}");
        assert_ne!(a, super::request_id());
    }
}
