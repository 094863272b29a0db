//! Listener sockets: bound before a snapshot is swapped in (a port that cannot
//! be bound rejects the config), kept across snapshots while their address
//! stays, closed when a snapshot drops them or the proxy drains. Each
//! accepted connection reads the current snapshot to learn whether it is
//! HTTP or TCP. With several workers, each has its own socket on every
//! listener address (SO_REUSEPORT) and accepts on its own event loop.
//! A listener serves at most `max_connections` connections, across its
//! workers: at the limit each worker holds the one connection it took
//! last, unserved, and stops accepting (the kernel's backlog holds the
//! rest) until one closes, so a flood of idle connections cannot take
//! every file descriptor (the admin listener and config reloads keep
//! theirs).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

use tokio::sync::Semaphore;

use crate::Shared;
use crate::config::{Direction, ListenerKind, PeerMtls, Snapshot};
use crate::error::RejectError;
use crate::workers::Workers;

pub struct Listeners {
    running: Mutex<HashMap<SocketAddr, Vec<JoinHandle<()>>>>,
    workers: Workers,
}

/// Sockets bound for a snapshot, not yet accepting: per address, one per
/// worker (std sockets: each worker registers its own with its runtime).
pub struct Bound(Vec<(SocketAddr, Vec<std::net::TcpListener>)>);

/// `reuse_port`: several sockets (one per worker) on one address, the
/// kernel spreading new connections over them.
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

impl Listeners {
    pub fn new(workers: Workers) -> Listeners {
        Listeners {
            running: Mutex::default(),
            workers,
        }
    }

    /// Binds every listener of `snap` that is not open yet.
    pub fn prepare(&self, snap: &Snapshot) -> Result<Bound, RejectError> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.workers.count();
        let mut bound = Vec::new();
        for (addr, l) in &snap.listeners {
            if running.contains_key(addr) {
                continue;
            }
            let mut socks = Vec::with_capacity(n);
            for _ in 0..n {
                let sock = bind(*addr, n > 1).map_err(|e| RejectError {
                    resource: format!("Listener/{}", l.name),
                    field: "address".into(),
                    message: format!("cannot listen on {addr}: {e}"),
                })?;
                socks.push(sock);
            }
            bound.push((*addr, socks));
        }
        Ok(Bound(bound))
    }

    /// Starts the newly bound listeners, each on every worker, and closes
    /// those `snap` no longer has.
    pub fn commit(&self, shared: &Arc<Shared>, bound: Bound, snap: &Snapshot) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|addr, tasks| {
            let keep = snap.listeners.contains_key(addr);
            if !keep {
                tracing::info!(%addr, "listener closed");
                for t in tasks.iter() {
                    t.abort();
                }
            }
            keep
        });
        for (addr, socks) in bound.0 {
            tracing::info!(%addr, workers = socks.len(), "listening");
            // One connection limit for the address, whichever worker accepts.
            let slots = Arc::new(Semaphore::new(shared.limits.max_connections));
            let tasks = socks
                .into_iter()
                .enumerate()
                .map(|(i, sock)| {
                    let (shared, slots) = (shared.clone(), slots.clone());
                    self.workers.spawn(i, async move {
                        // Registered with this worker's runtime.
                        match TcpListener::from_std(sock) {
                            Ok(sock) => accept_loop(shared, sock, addr, slots).await,
                            Err(e) => tracing::error!(%addr, error = %e, "listener lost"),
                        }
                    })
                })
                .collect();
            running.insert(addr, tasks);
        }
    }

    /// Forgets every listener: each accept loop, seeing the drain, takes
    /// what is already queued and closes its socket.
    pub fn close_all(&self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.clear();
    }

    pub fn addresses(&self) -> Vec<SocketAddr> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.keys().copied().collect()
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    sock: TcpListener,
    addr: SocketAddr,
    slots: Arc<Semaphore>,
) {
    // One subscription for the listener's life, not one per accept.
    let mut drain = shared.drain.watch();
    loop {
        let accepted = tokio::select! {
            a = sock.accept() => a,
            _ = drain.wait_for(|d| *d) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                // At the limit this worker holds the connection it took,
                // unserved, until one closes; it accepts no more meanwhile
                // (the rest wait in the kernel's backlog). A permit is taken
                // after the accept, not before: a worker idling in accept
                // must not hold a slot another worker's client needs.
                let permit = match slots.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => tokio::select! {
                        p = slots.clone().acquire_owned() => match p {
                            Ok(p) => Some(p),
                            Err(_) => return,
                        },
                        // Draining: served (told to close) like the backlog.
                        _ = drain.wait_for(|d| *d) => None,
                    },
                };
                serve(&shared, stream, peer, addr, permit);
            }
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(%addr, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    // Draining. Closing a listening socket resets the connections in its
    // backlog, whose clients have already sent a request. So: first drop
    // new SYNs (their clients retry and then find the port closed: refused,
    // before any request), let handshakes under way complete, take every
    // queued connection (they get `Connection: close`), then close.
    if let Err(e) = socket2::SockRef::from(&sock).attach_filter(&DROP_SYN) {
        tracing::debug!(%addr, error = %e, "cannot filter SYNs; closing at once");
    }
    while let Ok(Ok((stream, peer))) = tokio::time::timeout(BACKLOG_SETTLE, sock.accept()).await {
        let permit = slots.clone().try_acquire_owned().ok();
        serve(&shared, stream, peer, addr, permit);
    }
    tracing::info!(%addr, "listener closed (drain)");
}

/// How long a draining listener waits for handshakes under way.
const BACKLOG_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// A classic BPF socket filter on the listening socket: drop a segment
/// whose flags are SYN without ACK (a new connection), pass the rest (the
/// ACK that completes a handshake already under way). On a TCP socket the
/// filter sees the TCP header first: byte 13 holds the flags.
const DROP_SYN: [socket2::SockFilter; 5] = [
    // ldb [13]
    socket2::SockFilter::new(0x30, 0, 0, 13),
    // and #(SYN|ACK)
    socket2::SockFilter::new(0x54, 0, 0, 0x12),
    // jeq #SYN ? drop : keep
    socket2::SockFilter::new(0x15, 0, 1, 0x02),
    // ret #0: drop
    socket2::SockFilter::new(0x06, 0, 0, 0),
    // ret #-1: keep the whole segment
    socket2::SockFilter::new(0x06, 0, 0, u32::MAX),
];

fn serve(
    shared: &Arc<Shared>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    addr: SocketAddr,
    permit: impl Send + 'static,
) {
    let _ = stream.set_nodelay(true);
    shared
        .metrics
        .downstream_connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tracked = shared.drain.track();
    let snap = shared.snapshot.load_full();
    let Some(l) = snap.listeners.get(&addr) else {
        return;
    };
    let shared = shared.clone();
    if l.tls.is_some() {
        let l = l.clone();
        drop(snap);
        tokio::spawn(async move {
            crate::http::serve::serve_gateway_tls(shared, l, stream, peer, addr, tracked).await;
            drop(permit);
        });
        return;
    }
    // Under capture, where the client was going: one getsockopt per
    // connection, on sidecar HTTP listeners only (gateways are never
    // captured, and TCP listeners route by their own port).
    let original =
        if l.direction == Direction::Gateway || !matches!(l.kind, ListenerKind::Http { .. }) {
            None
        } else {
            crate::original_dst::original_dst(&stream)
        };
    if let (Some(table), Some(dst)) = (&l.capture, original) {
        let (table, l) = (table.clone(), l.clone());
        drop(snap);
        tokio::spawn(async move {
            if table.inbound {
                crate::capture::serve_inbound(shared, l, table, stream, peer, dst, tracked).await
            } else {
                crate::capture::serve_outbound(shared, table, stream, peer, addr, dst, tracked)
                    .await
            }
            drop(permit);
        });
        return;
    }
    match l.kind {
        ListenerKind::Http { .. } => {
            let mtls = l.peer_mtls;
            drop(snap);
            tokio::spawn(async move {
                match mtls {
                    PeerMtls::Disable => {
                        crate::http::serve_connection(shared, stream, peer, addr, original, tracked)
                            .await
                    }
                    PeerMtls::Permissive | PeerMtls::Strict => {
                        let strict = mtls == PeerMtls::Strict;
                        let inbound = crate::http::serve::Inbound {
                            original_dst: original,
                            strict,
                            tcp: crate::capture::InboundTcp::Never,
                        };
                        crate::http::serve::serve_inbound(
                            shared, stream, peer, addr, inbound, tracked,
                        )
                        .await
                    }
                }
                drop(permit);
            });
        }
        ListenerKind::Tcp { .. } => {
            tokio::spawn(async move {
                crate::tcp::serve_connection(shared, snap, stream, peer, addr, tracked).await;
                drop(permit);
            });
        }
    }
}
