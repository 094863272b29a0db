//! Where a captured connection was going: the destination the kernel
//! rewrote when `bosun capture`'s rules redirected it to a sidecar port
//! (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`), read through nix (no
//! unsafe code here).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

/// The original destination of `s`; `None` if the connection was not
/// redirected (or the kernel has no record of it).
pub fn original_dst(s: &TcpStream) -> Option<SocketAddr> {
    // The connection's own address, not the listener's (which may be ::).
    let local = s.local_addr().ok()?;
    let v4 = match local {
        SocketAddr::V4(_) => true,
        // A dual-stack listener sees IPv4 peers as v4-mapped addresses;
        // their NAT record is IPv4's.
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let found = if v4 {
        let sa = getsockopt(s, sockopt::OriginalDst).ok()?;
        SocketAddr::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)).into(),
            u16::from_be(sa.sin_port),
        )
    } else {
        let sa = getsockopt(s, sockopt::Ip6tOriginalDst).ok()?;
        SocketAddr::new(
            Ipv6Addr::from(sa.sin6_addr.s6_addr).into(),
            u16::from_be(sa.sin6_port),
        )
    };
    let local_port = local.port();
    let same = found.port() == local_port
        && match (found, local) {
            (SocketAddr::V4(f), SocketAddr::V6(l)) => l.ip().to_ipv4_mapped() == Some(*f.ip()),
            (f, l) => f.ip() == l.ip(),
        };
    (!same).then_some(found)
}
