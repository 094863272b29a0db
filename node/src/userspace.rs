//! The userspace backend, for hosts with neither nftables nor iptables: an
//! in-process L4 proxy, like kube-proxy's old userspace mode. Every service
//! address (cluster, external and load-balancer IPs) gets a `local` route
//! on `lo` (`ip route … proto 249`, removed on exit) and a listener bound
//! to it; NodePorts listen on every address. A connection goes to an
//! endpoint chosen by weight, or the client's last endpoint under
//! `sessionAffinity: ClientIP`, and bytes are copied both ways.
//!
//! Limits, inherent to proxying: the endpoint sees the node's address, not
//! the client's (so `externalTrafficPolicy: Local` only restricts the
//! choice to local endpoints), and only TCP is carried.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::services::{Endpoint, Family, Proto, ServiceMap};

/// The `ip route` protocol number marking Bosun's local routes.
pub const ROUTE_PROTO: &str = "249";

/// Where connections to one listening address go.
#[derive(Clone, Debug, PartialEq)]
struct Target {
    endpoints: Vec<Endpoint>,
    affinity: Option<Duration>,
    /// Rejected source ranges apply (load-balancer IPs).
    source_ranges: Vec<(IpAddr, u8)>,
}

#[derive(Default)]
struct Affinity {
    /// (service address, client) → (endpoint, when the stickiness ends).
    by_client: HashMap<(SocketAddr, IpAddr), (Endpoint, Instant)>,
}

/// The running proxy: listeners by address, their targets, and the routes
/// it added.
#[derive(Default)]
pub struct Userspace {
    targets: Arc<Mutex<HashMap<SocketAddr, Target>>>,
    listeners: BTreeMap<SocketAddr, JoinHandle<()>>,
    routes: BTreeSet<IpAddr>,
    affinity: Arc<Mutex<Affinity>>,
    /// One clone per proxied connection: its count is what a drain waits for.
    active: Arc<()>,
}

fn in_range(ip: IpAddr, ranges: &[(IpAddr, u8)]) -> bool {
    // An IPv4 client on a dual-stack listener shows as ::ffff:a.b.c.d.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let bits = |a: IpAddr| -> (u128, u32) {
        match a {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        }
    };
    ranges.iter().any(|(net, len)| {
        let ((a, w), (n, wn)) = (bits(ip), bits(*net));
        if w != wn {
            return false;
        }
        let len = u32::from(*len).min(w);
        let shift = w - len;
        len == 0 || (a >> shift) == (n >> shift)
    })
}

fn pick(eps: &[Endpoint], skip: &BTreeSet<(IpAddr, u16)>) -> Option<Endpoint> {
    let left: Vec<&Endpoint> = eps
        .iter()
        .filter(|e| !skip.contains(&(e.ip, e.port)))
        .collect();
    let total: u64 = left.iter().map(|e| u64::from(e.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut n = rand_below(total);
    for e in left {
        let w = u64::from(e.weight);
        if n < w {
            return Some(e.clone());
        }
        n -= w;
    }
    None
}

fn rand_below(n: u64) -> u64 {
    use rand::RngExt;
    rand::rng().random_range(0..n)
}

async fn run_cmd(args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    // The service IP's local route may come a moment later.
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
    } else {
        s.set_freebind_v6(true)?;
        // [::]:nodePort takes IPv4 clients too.
        s.set_only_v6(false)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

impl Userspace {
    /// Makes listeners, routes and targets match `services`.
    pub async fn apply(&mut self, services: &ServiceMap) -> Result<(), String> {
        let mut want: HashMap<SocketAddr, Target> = HashMap::new();
        let mut ips = BTreeSet::new();
        for sp in services.values() {
            if sp.proto != Proto::Tcp {
                tracing::warn!(service = %sp.id, "the userspace backend carries TCP only; skipped");
                continue;
            }
            let affinity = sp
                .affinity_timeout
                .map(|t| Duration::from_secs(u64::from(t)));
            let cluster = sp.cluster_endpoints();
            let external = sp.external_endpoints();
            let ranges: Vec<(IpAddr, u8)> = sp
                .source_ranges
                .iter()
                .filter_map(|r| crate::services::parse_cidr(r))
                .collect();
            let mut listen =
                |ip: &IpAddr, endpoints: &[Endpoint], source_ranges: &[(IpAddr, u8)]| {
                    ips.insert(*ip);
                    if !endpoints.is_empty() {
                        want.insert(
                            SocketAddr::new(*ip, sp.port),
                            Target {
                                endpoints: endpoints.to_vec(),
                                affinity,
                                source_ranges: source_ranges.to_vec(),
                            },
                        );
                    }
                };
            for ip in &sp.cluster_ips {
                listen(ip, &cluster, &[]);
            }
            if external.is_empty() {
                continue;
            }
            for ip in &sp.external_ips {
                listen(ip, &external, &[]);
            }
            for ip in &sp.load_balancer_ips {
                listen(ip, &external, &ranges);
            }
            if let Some(np) = sp.node_port {
                // One dual-stack listener per NodePort, for both families.
                want.insert(
                    SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), np),
                    Target {
                        endpoints: external.clone(),
                        affinity,
                        source_ranges: vec![],
                    },
                );
            }
        }
        for ip in ips.difference(&self.routes.clone()) {
            local_route("replace", ip).await?;
            self.routes.insert(*ip);
        }
        // Listeners: close what is gone (a service without endpoints has
        // none, so connections are refused at once), open what is new.
        let gone: Vec<SocketAddr> = self
            .listeners
            .keys()
            .filter(|a| !want.contains_key(a))
            .copied()
            .collect();
        for a in gone {
            if let Some(h) = self.listeners.remove(&a) {
                h.abort();
            }
        }
        *self.targets.lock().unwrap_or_else(|p| p.into_inner()) = want.clone();
        for addr in want.keys() {
            if self.listeners.contains_key(addr) {
                continue;
            }
            let listener = bind(*addr).map_err(|e| format!("userspace listener {addr}: {e}"))?;
            let (targets, affinity) = (self.targets.clone(), self.affinity.clone());
            let active = self.active.clone();
            let addr = *addr;
            self.listeners.insert(
                addr,
                tokio::spawn(async move {
                    loop {
                        let Ok((client, peer)) = listener.accept().await else {
                            continue;
                        };
                        let target = targets
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&addr)
                            .cloned();
                        let Some(target) = target else { continue };
                        let (affinity, active) = (affinity.clone(), active.clone());
                        tokio::spawn(async move {
                            let _active = active;
                            forward(client, peer, addr, target, affinity).await;
                        });
                    }
                }),
            );
        }
        let stale: Vec<IpAddr> = self.routes.difference(&ips).copied().collect();
        for ip in stale {
            let _ = local_route("del", &ip).await;
            self.routes.remove(&ip);
        }
        Ok(())
    }

    /// Closes every listener, lets the proxied connections finish for up to
    /// `drain` (their packets need the local routes), then removes every
    /// route this proxy added.
    pub async fn shutdown(&mut self, drain: Duration) {
        for (_, h) in std::mem::take(&mut self.listeners) {
            h.abort();
        }
        let deadline = Instant::now() + drain;
        while Arc::strong_count(&self.active) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = Arc::strong_count(&self.active) - 1;
        if left > 0 {
            tracing::warn!(
                connections = left,
                "drain over; closing proxied connections"
            );
        }
        for ip in std::mem::take(&mut self.routes) {
            let _ = local_route("del", &ip).await;
        }
    }
}

/// Removes Bosun's local routes left by a userspace backend that was killed.
pub async fn cleanup() -> Result<(), String> {
    for family in ["-4", "-6"] {
        run_cmd(&[
            family,
            "route",
            "flush",
            "table",
            "local",
            "proto",
            ROUTE_PROTO,
        ])
        .await?;
    }
    Ok(())
}

/// `ip route VERB local IP/host dev lo table local proto 249`.
async fn local_route(verb: &str, ip: &IpAddr) -> Result<(), String> {
    let (flag, dst) = match Family::of(ip) {
        Family::V4 => ("-4", format!("{ip}/32")),
        Family::V6 => ("-6", format!("{ip}/128")),
    };
    run_cmd(&[
        flag,
        "route",
        verb,
        "local",
        &dst,
        "dev",
        "lo",
        "table",
        "local",
        "proto",
        ROUTE_PROTO,
    ])
    .await
}

async fn forward(
    mut client: TcpStream,
    peer: SocketAddr,
    addr: SocketAddr,
    target: Target,
    affinity: Arc<Mutex<Affinity>>,
) {
    if !target.source_ranges.is_empty() && !in_range(peer.ip(), &target.source_ranges) {
        return; // loadBalancerSourceRanges: closed
    }
    let key = (addr, peer.ip());
    let sticky = target.affinity.and_then(|_| {
        let mut a = affinity.lock().unwrap_or_else(|p| p.into_inner());
        match a.by_client.get(&key) {
            Some((ep, until)) if Instant::now() < *until && target.endpoints.contains(ep) => {
                Some(ep.clone())
            }
            Some(_) => {
                a.by_client.remove(&key);
                None
            }
            None => None,
        }
    });
    let mut tried = BTreeSet::new();
    let mut next = sticky;
    loop {
        let Some(ep) = next.take().or_else(|| pick(&target.endpoints, &tried)) else {
            return; // every endpoint refused: the client sees the close
        };
        tried.insert((ep.ip, ep.port));
        let conn = tokio::time::timeout(
            Duration::from_secs(3),
            TcpStream::connect(SocketAddr::new(ep.ip, ep.port)),
        )
        .await;
        let Ok(Ok(mut upstream)) = conn else {
            continue;
        };
        if let Some(ttl) = target.affinity {
            let mut a = affinity.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // Forget expired clients now and then, so the table stays bounded.
            if a.by_client.len() >= 4096 && a.by_client.len().is_power_of_two() {
                a.by_client.retain(|_, (_, until)| *until > now);
            }
            a.by_client.insert(key, (ep, now + ttl));
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        return;
    }
}
